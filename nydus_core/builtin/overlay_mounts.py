"""The default mount producer: exactly what containerd's overlayfs snapshotter returns."""

from __future__ import annotations

from nydus_core.config import SnapshotterConfig
from nydus_core.hookspecs import hookimpl
from nydus_core.snapshot.model import Mount, MountRequest


@hookimpl(trylast=True)
def nydus_mounts(request: MountRequest, config: SnapshotterConfig) -> list[Mount] | None:
    from nydus_core.snapshot.mounts import native_or_image_mounts

    return native_or_image_mounts(request, config)
