"""The engines behind the image tools (``nydusify``, ``nydus-image``)."""
