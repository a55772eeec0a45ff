"""The built-in ``nydus`` image format: a RAFS bootstrap layer plus data blobs.

Layer types are decided by label *presence*, as upstream does:

* ``containerd.io/snapshot/nydus-blob``: a data blob. It is never downloaded by containerd: the
  daemon reads its chunks lazily from the registry, so the layer is claimed.
* ``containerd.io/snapshot/nydus-bootstrap``: the meta layer, a small tar holding
  ``image/image.boot``. containerd unpacks it like any layer (not claimed).

For a container snapshot the chain is walked, nearest parent first, for the meta layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import ChainEntry, ImageSource, Layer, LayerClaim
from nydus_core.errors import FailedPrecondition
from nydus_core.hookspecs import hookimpl
from nydus_core.records import FormatRecord, ImageFormat

FORMAT = "nydus"

MISSING_REF_HINT = (
    "containerd did not pass the image reference labels ({cri} or {stargz}); nydus images need them. "
    "With CRI set `disable_snapshot_annotations = false` in containerd's "
    '[plugins."io.containerd.grpc.v1.cri".containerd] section; otherwise pull with nerdctl '
    '(proxy plugin name containing "nydus") or `ctr-remote image rpull` '
    "(`ctr image pull` sends no labels)"
)


def bootstrap_path(upper: Path) -> Path:
    """``<upper>/image/image.boot``, or the legacy ``<upper>/image.boot`` when only that exists."""
    current = upper / "image" / "image.boot"
    legacy = upper / "image.boot"
    if not current.exists() and legacy.exists():
        return legacy
    return current


class NydusFormat(ImageFormat):
    """Data layers are claimed (the daemon reads them lazily); the meta layer is unpacked by
    containerd and its ``image/image.boot`` is the bootstrap every backend serves."""

    def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        if L.is_nydus_meta_layer(layer.labels):
            return None  # the bootstrap layer is unpacked by containerd
        if L.is_nydus_data_layer(layer.labels):
            return LayerClaim(format=FORMAT)
        return None

    def find_image(
        self, key: str, chain: Sequence[ChainEntry], config: SnapshotterConfig
    ) -> ImageSource | None:
        for entry in chain:
            if not L.is_nydus_meta_layer(entry.labels):
                continue
            ref = L.image_ref(entry.labels)
            if ref is None:
                raise FailedPrecondition(
                    f"failed to find the image reference of nydus meta snapshot {entry.id} "
                    f"({entry.name}) for {key}: "
                    + MISSING_REF_HINT.format(cri=L.CRI_IMAGE_REF, stargz=L.STARGZ_REFERENCE)
                )
            bootstrap = bootstrap_path(entry.upper)
            if not bootstrap.is_file():
                raise FailedPrecondition(
                    f"nydus meta snapshot {entry.id} ({entry.name}) has no bootstrap: neither "
                    f"{entry.upper / 'image' / 'image.boot'} nor {entry.upper / 'image.boot'} exists"
                )
            return ImageSource(
                format=FORMAT, meta_id=entry.id, bootstrap=bootstrap, image_ref=ref, labels=dict(entry.labels)
            )
        return None


@hookimpl
def nydus_formats() -> Iterator[FormatRecord]:
    yield FormatRecord(name=FORMAT, format=NydusFormat(), priority=100,
                       description="RAFS v6/v5 bootstrap layer + blobs (nydusify, nydus-image)")  # fmt: skip
