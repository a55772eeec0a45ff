"""Label keys containerd, CRI, nerdctl and the nydus tools put on snapshots.

The keys are facts of the ecosystem: they must match upstream byte for byte.
Presence of a key, not its value, decides a layer's type (as upstream does).
"""

from __future__ import annotations

from collections.abc import Mapping

# Set by containerd's unpacker on every layer it is about to unpack: the target chain ID.
TARGET_SNAPSHOT_REF = "containerd.io/snapshot.ref"
# Prefix containerd keeps when it copies descriptor annotations into snapshot labels.
INHERITED_PREFIX = "containerd.io/snapshot/"

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"

OVERLAY_VOLATILE = "containerd.io/snapshot/overlay.volatile"
UID_MAPPING = "containerd.io/snapshot/uidmapping"
GID_MAPPING = "containerd.io/snapshot/gidmapping"

NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_REF = "containerd.io/snapshot/nydus-ref"
NYDUS_SIGNATURE = "containerd.io/snapshot/nydus-signature"
NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
NYDUS_REFERENCE_BLOB_IDS = "containerd.io/snapshot/nydus-reference-blob-ids"
NYDUS_TARFS = "containerd.io/snapshot/nydus-tarfs"
NYDUS_PROXY_MODE = "containerd.io/snapshot/nydus-proxy-mode"
NYDUS_INDEX_ALTERNATIVE = "containerd.io/snapshot/nydus-index-alternative"
STARGZ = "containerd.io/snapshot/stargz"
PULL_USERNAME = "containerd.io/snapshot/pullusername"
PULL_SECRET = "containerd.io/snapshot/pullsecret"
UNCOMPRESSED = "containerd.io/uncompressed"

# containerd refuses a label whose key and value together exceed this many bytes.
MAX_LABEL_BYTES = 4096
_KEY_SHOWN = 64  # containerd cuts the key to this in its message


def validate(labels: Mapping[str, str]) -> None:
    """Refuse labels as containerd's metadata store does: key and value together at most
    `MAX_LABEL_BYTES` bytes (UTF-8); and an empty key, which no client means to send."""
    from nydus_core.errors import InvalidArgument

    for key, value in labels.items():
        if not key:
            raise InvalidArgument("label key must not be empty")
        total = len(key.encode()) + len(value.encode())
        if total > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label key and value length ({total} bytes) greater than maximum size "
                f"({MAX_LABEL_BYTES} bytes), key: {key[:_KEY_SHOWN]}"
            )


def image_ref(labels: Mapping[str, str]) -> str | None:
    """The image reference a layer belongs to: CRI's label first, BuildKit's stargz label second."""
    return labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE) or None


def is_unpack_layer(labels: Mapping[str, str]) -> bool:
    """True for a read-only layer containerd is unpacking (it carries the target chain ID)."""
    return TARGET_SNAPSHOT_REF in labels


def is_nydus_meta_layer(labels: Mapping[str, str]) -> bool:
    return NYDUS_BOOTSTRAP in labels


def is_nydus_data_layer(labels: Mapping[str, str]) -> bool:
    return NYDUS_BLOB in labels
