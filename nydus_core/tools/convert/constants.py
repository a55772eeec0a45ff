"""Media types and annotation keys of nydus images, as nydusify and the containerd converter write them.

Facts from upstream (`nydus-snapshotter/pkg/converter/constant.go`, `pkg/label`); the snapshotter
tests these annotations by key to tell a bootstrap layer from a data layer.
"""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

#: Source layer media types the converter can read (plain, gzip or zstd tars).
SOURCE_LAYER_TYPES = frozenset(
    {OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR}
)

NYDUS_BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"

ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANNOTATION_NYDUS_REFERENCE_BLOB_IDS = "containerd.io/snapshot/nydus-reference-blob-ids"
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"

#: Where the bootstrap lives inside the bootstrap layer tar.
BOOTSTRAP_DIR_IN_LAYER = "image"
BOOTSTRAP_NAME_IN_LAYER = "image/image.boot"

#: History entry nydus converters append for the bootstrap layer.
BOOTSTRAP_HISTORY = {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}
