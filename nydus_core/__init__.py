"""nydus-core: a containerd proxy snapshotter with lazily pulled images, in Python."""

from nydus_core.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]

__version__ = "0.1.0"
