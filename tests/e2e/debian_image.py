"""The e2e image builder now lives in `nydus_core.testing.debian_image` (the benchmark shares it)."""

from nydus_core.testing.debian_image import (
    CACHE_DIR,
    DebianImage,
    ImageBuildError,
    build_debian_py_image,
    rootfs_tarball,
)

__all__ = ["CACHE_DIR", "DebianImage", "ImageBuildError", "build_debian_py_image", "rootfs_tarball"]
