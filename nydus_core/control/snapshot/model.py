"""The snapshot data model shared by the metastore, the service and the hooks.

It mirrors containerd's `snapshots.Info` / `storage.Snapshot` so that semantics carry over
without translation: kinds, names, parents, labels and timestamps.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from nydus_core.control.daemons.model import Instance


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as the `containerd.services.snapshots.v1.Kind` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@attrs.frozen
class Info:
    """What containerd knows of a snapshot (`Stat`, `List`, `Update`)."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = attrs.field(factory=dict)
    created_at: int = 0  # nanoseconds since the epoch
    updated_at: int = 0


@attrs.frozen
class Usage:
    size: int = 0
    inodes: int = 0


@attrs.frozen
class Snapshot:
    """A snapshot as the storage layer sees it: its stable numeric id and its ancestors.

    `parent_ids` is nearest first, which is exactly the overlay `lowerdir` order.
    """

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()


@attrs.frozen
class Mount:
    """One `containerd.types.Mount`."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@attrs.frozen
class SnapshotPaths:
    """Where a snapshot's directories live under the snapshotter root."""

    root: Path

    def snapshot_dir(self, sid: str) -> Path:
        return self.root / "snapshots" / sid

    def upper(self, sid: str) -> Path:
        return self.root / "snapshots" / sid / "fs"

    def work(self, sid: str) -> Path:
        return self.root / "snapshots" / sid / "work"

    def mnt(self, sid: str) -> Path:
        return self.root / "snapshots" / sid / "mnt"


@attrs.frozen
class Layer:
    """A read-only layer containerd is about to unpack, as the detection hooks see it.

    `snapshot_id` / `upper` are the active snapshot just created for it: a format plugin that
    claims the layer may write what it needs (a bootstrap, an index) into `upper` before the
    snapshotter commits it under `target`.
    """

    key: str
    parent: str
    target: str  # the value of containerd.io/snapshot.ref: the chain ID to commit under
    labels: dict[str, str]
    snapshot_id: str
    upper: Path
    chain: tuple[ChainEntry, ...] = ()  # the committed parents, nearest first


@attrs.frozen
class LayerClaim:
    """A format plugin's answer that it serves a layer lazily: containerd must not download it.

    `labels` are added to the committed snapshot's labels (e.g. `containerd.io/snapshot/stargz`).
    """

    format: str
    labels: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class ChainEntry:
    """One snapshot in a parent chain handed to `nydus_find_image` (nearest parent first)."""

    id: str
    name: str
    labels: dict[str, str]
    upper: Path


@attrs.frozen
class ImageSource:
    """An image a format plugin found in a container's parent chain, to be served by a backend.

    `meta_id` is the snapshot id of the layer holding the bootstrap; one RAFS instance serves all
    containers on that meta snapshot. `bootstrap` is the RAFS v6 (or v5) bootstrap file.
    `backend` names the backend record that must serve it when the format needs a particular one
    (tarfs: ``blockdev``); empty means the configured ``[daemon] fs_driver``. `covers` are the
    ids of the parent snapshots the image replaces in the overlay (the others stay lower dirs
    where they are); ``None`` means every parent, as for a nydus image.
    """

    format: str
    meta_id: str
    bootstrap: Path
    image_ref: str
    labels: dict[str, str] = attrs.field(factory=dict)
    backend: str = ""
    covers: tuple[str, ...] | None = None


@attrs.frozen
class MountRequest:
    """Everything a mount producer needs to build the mount list for one snapshot.

    `lowers` are the parent upper dirs nearest first; `image_mountpoint` is set when the chain is
    served lazily by a backend (then it replaces the lowers that the image covers), with the
    `image` and its `instance` (whose ``fs_driver`` names the backend and whose ``backend_data``
    holds what the backend recorded for it).
    """

    id: str
    key: str
    kind: Kind
    upper: Path
    work: Path
    lowers: tuple[Path, ...]
    labels: dict[str, str]
    image_mountpoint: Path | None = None
    image: ImageSource | None = None
    instance: Instance | None = None
