"""nydus-core: a containerd proxy snapshotter with lazily pulled images, in Python."""

__version__ = "0.1.0"
