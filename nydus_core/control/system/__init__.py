"""The snapshotter's system controller API (``[system]`` in config.toml); see `controller`."""

from nydus_core.control.system.controller import SystemController, SystemControllerError

__all__ = ["SystemController", "SystemControllerError"]
