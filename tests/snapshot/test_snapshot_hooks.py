"""The hooks the snapshotter core calls: mount production and the snapshot events."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import grpc
from snap_helpers import commit, expect_code, mounts, prepare, prepare_l, remove, shape

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import Info, Kind, Layer, LayerClaim, Mount, MountRequest
from nydus_core.hookspecs import hookimpl
from nydus_core.records import FormatRecord, ImageFormat


class NydusOverlayfsMounts:
    """Turns overlay mounts of snapshots labelled ``use-helper`` into fuse.nydus-overlayfs mounts."""

    def __init__(self) -> None:
        self.requests: list[MountRequest] = []

    @hookimpl
    def nydus_mounts(self, request: MountRequest, config: SnapshotterConfig) -> list[Mount] | None:
        self.requests.append(request)
        if "use-helper" not in request.labels:
            return None  # let the built-in producer answer
        extra = base64.b64encode(json.dumps({"snapshotdir": str(request.upper.parent)}).encode()).decode()
        return [Mount(type="fuse.nydus-overlayfs", source="overlay",
                      options=(f"upperdir={request.upper}", f"extraoption={extra}"))]


def test_nydus_mounts_plugin_overrides_and_falls_back(start_snapshotter: Any) -> None:
    plugin = NydusOverlayfsMounts()
    s = start_snapshotter(plugins=[plugin])
    snaps = s.root / "snapshots"
    prepare(s.stub, "a")
    commit(s.stub, "base", "a")
    [m] = prepare(s.stub, "ctr", "base", **{"use-helper": "1"})
    assert m.type == "fuse.nydus-overlayfs" and m.options[0] == f"upperdir={snaps}/2/fs"
    assert json.loads(base64.b64decode(m.options[1].split("=", 1)[1])) == {"snapshotdir": f"{snaps}/2"}
    assert shape(mounts(s.stub, "ctr")) == shape([m])  # Mounts asks the producers again
    [plain] = prepare(s.stub, "ctr2", "base")
    assert plain.type == "overlay"  # plugin returned None: the built-in overlay producer answered
    req = plugin.requests[-1]
    assert (req.key, req.kind, req.id) == ("ctr2", Kind.ACTIVE, "3")
    assert req.upper == snaps / "3" / "fs" and req.work == snaps / "3" / "work"
    assert req.lowers == (snaps / "1" / "fs",) and req.image_mountpoint is None


class Events(ImageFormat):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, Kind, bool | None]] = []

    @hookimpl
    def nydus_formats(self) -> Iterator[FormatRecord]:
        yield FormatRecord(name="t", format=self)

    def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        return LayerClaim(format="t") if "lazy" in layer.labels else None

    @hookimpl
    def nydus_snapshot_committed(self, info: Info, remote: bool) -> None:
        self.log.append(("committed", info.name, info.kind, remote))

    @hookimpl
    def nydus_snapshot_removed(self, info: Info) -> None:
        self.log.append(("removed", info.name, info.kind, None))


def test_nydus_snapshot_committed_local_and_remote(start_snapshotter: Any) -> None:
    ev = Events()
    s = start_snapshotter(plugins=[ev])
    prepare(s.stub, "a")
    commit(s.stub, "local", "a")
    expect_code(grpc.StatusCode.ALREADY_EXISTS,
                lambda: prepare_l(s.stub, "b", "local", {L.TARGET_SNAPSHOT_REF: "remote", "lazy": "1"}))
    assert ev.log == [
        ("committed", "local", Kind.COMMITTED, False),
        ("committed", "remote", Kind.COMMITTED, True),
    ]


def test_nydus_snapshot_removed_after_the_record_is_gone(start_snapshotter: Any) -> None:
    ev = Events()
    s = start_snapshotter(plugins=[ev])
    prepare(s.stub, "a")
    remove(s.stub, "a")
    assert ev.log == [("removed", "a", Kind.ACTIVE, None)]
    assert s.snapshotter.ms.walk() == []
