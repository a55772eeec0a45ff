"""The remote-snapshot ("already exists") protocol and lazily served images, with small test plugins."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Served
from snap_helpers import (
    commit,
    expect_code,
    list_names,
    mounts,
    prepare,
    prepare_l,
    remove,
    shape,
    stat,
    view,
)

from nydus_core import labels as L
from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.model import Instance
from nydus_core.control.snapshot.model import ChainEntry, ImageSource, Info, Layer, LayerClaim
from nydus_core.control.snapshot.overlay_mounts import OVERLAY_INDEX_PARAM
from nydus_core.hookspecs import hookimpl
from nydus_core.records import FormatRecord, ImageFormat

C = grpc.StatusCode
LAZY = "containerd.io/snapshot/test-lazy"
CLAIMED = "containerd.io/snapshot/test-claimed"


class LazyLayers(ImageFormat):
    """A format that claims every layer labelled `LAZY` and writes a marker into its upper dir."""

    def __init__(self) -> None:
        self.claimed: list[Layer] = []
        self.committed: list[tuple[Info, bool]] = []
        self.removed: list[Info] = []
        self.lock = threading.Lock()

    @hookimpl
    def nydus_formats(self) -> Iterator[FormatRecord]:
        yield FormatRecord(name="test-lazy", format=self, priority=1000)

    def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        if LAZY not in layer.labels:
            return None
        (layer.upper / "marker").write_text(layer.target)
        with self.lock:
            self.claimed.append(layer)
        return LayerClaim(format="test", labels={CLAIMED: "yes"})

    @hookimpl
    def nydus_snapshot_committed(self, info: Info, remote: bool) -> None:
        with self.lock:
            self.committed.append((info, remote))

    @hookimpl
    def nydus_snapshot_removed(self, info: Info) -> None:
        with self.lock:
            self.removed.append(info)


def _unpack_labels(target: str, lazy: bool = True) -> dict[str, str]:
    labels = {L.TARGET_SNAPSHOT_REF: target, L.CRI_LAYER_DIGEST: "sha256:" + "d" * 64}
    if lazy:
        labels[LAZY] = "true"
    return labels


@pytest.fixture
def lazy(start_snapshotter: Any) -> tuple[Served, LazyLayers]:
    plugin = LazyLayers()
    return start_snapshotter(plugins=[plugin]), plugin


def test_claimed_layer_is_committed_and_already_exists(lazy: tuple[Served, LazyLayers]) -> None:
    served, plugin = lazy
    stub = served.stub
    prepare(stub, "k8s.io/1/extract-1 sha256:base")
    commit(stub, "k8s.io/2/sha256:base", "k8s.io/1/extract-1 sha256:base")
    key = "k8s.io/3/extract-495760664-EQHX sha256:t"
    labels = _unpack_labels("sha256:t")
    msg = expect_code(C.ALREADY_EXISTS, lambda: prepare_l(stub, key, "k8s.io/2/sha256:base", labels))
    assert msg == 'target snapshot "sha256:t": already exists'

    info = stat(stub, "sha256:t")  # what the unpacker Stats next
    assert info.kind == pb.COMMITTED
    assert info.parent == "k8s.io/2/sha256:base"
    assert dict(info.labels) == {**labels, CLAIMED: "yes"}  # all labels, snapshot.ref included
    expect_code(C.NOT_FOUND, lambda: stat(stub, key))  # the active key was consumed

    flt = 'labels."containerd.io/snapshot.ref"==sha256:t,parent=="k8s.io/2/sha256:base"'
    [resp] = list(stub.List(pb.ListSnapshotsRequest(filters=[flt])))
    [listed] = resp.info
    assert (listed.name, listed.kind, listed.parent) == ("sha256:t", pb.COMMITTED, "k8s.io/2/sha256:base")
    assert dict(listed.labels) == {**labels, CLAIMED: "yes"}

    [layer] = plugin.claimed
    assert (layer.key, layer.parent, layer.target) == (key, "k8s.io/2/sha256:base", "sha256:t")
    assert (served.root / "snapshots" / layer.snapshot_id / "fs" / "marker").read_text() == "sha256:t"
    assert [(i.name, r) for i, r in plugin.committed] == [("k8s.io/2/sha256:base", False), ("sha256:t", True)]

    # a container on top of the lazily taken layer is an ordinary native overlay here
    [m] = prepare(stub, "k8s.io/4/ctr", "sha256:t")
    assert m.type == "overlay"


def test_unclaimed_layer_is_unpacked_normally(lazy: tuple[Served, LazyLayers]) -> None:
    served, plugin = lazy
    key = "k8s.io/1/extract-2 sha256:plain"
    [m] = prepare_l(served.stub, key, "", _unpack_labels("sha256:plain", lazy=False))
    assert shape([m])[0][0] == "bind"
    assert stat(served.stub, key).kind == pb.ACTIVE
    assert plugin.claimed == []


def test_duplicate_pull_of_the_same_target(lazy: tuple[Served, LazyLayers]) -> None:
    served, plugin = lazy
    stub = served.stub
    labels = _unpack_labels("sha256:dup")
    expect_code(C.ALREADY_EXISTS, lambda: prepare_l(stub, "k8s.io/1/extract-a sha256:dup", "", labels))
    # a second pull (e.g. another image sharing the layer) before containerd noticed
    expect_code(C.ALREADY_EXISTS, lambda: prepare_l(stub, "k8s.io/2/extract-b sha256:dup", "", labels))
    assert list_names(stub) == ["sha256:dup"]
    assert len(plugin.claimed) == 2
    assert [i.name for i in plugin.removed] == ["k8s.io/2/extract-b sha256:dup"]


def test_concurrent_duplicate_pulls(lazy: tuple[Served, LazyLayers]) -> None:
    served, _ = lazy
    stub = served.stub
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def pull(i: int) -> None:
        try:
            prepare_l(stub, f"k8s.io/{i}/extract-{i} sha256:race", "", _unpack_labels("sha256:race"))
            code = C.OK
        except grpc.RpcError as err:
            code = err.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [C.ALREADY_EXISTS] * 12
    assert list_names(stub) == ["sha256:race"]
    stub.Cleanup(pb.CleanupRequest())
    snapshot_dirs = sorted(p.name for p in (served.root / "snapshots").iterdir())
    assert snapshot_dirs == [served.snapshotter.ms.get("sha256:race").id]


# ------------------------------------------------------------------------- lazily served images


class FindTestImage(ImageFormat):
    """A format that finds the nearest ancestor labelled with a nydus bootstrap (like the built-in
    nydus format, asked before it)."""

    def __init__(self) -> None:
        self.chains: list[list[ChainEntry]] = []

    @hookimpl
    def nydus_formats(self) -> Iterator[FormatRecord]:
        yield FormatRecord(name="test-find", format=self, priority=1000)

    def find_image(
        self, key: str, chain: Sequence[ChainEntry], config: SnapshotterConfig
    ) -> ImageSource | None:
        self.chains.append(list(chain))
        for entry in chain:
            if L.NYDUS_BOOTSTRAP in entry.labels:
                return ImageSource(format="test", meta_id=entry.id, bootstrap=entry.upper / "image.boot",
                                   image_ref="localhost/test:1", labels={"from-source": "1"})
        return None


class DirImages:
    """A minimal ImageService: the "instance" is a directory standing in for a RAFS mountpoint."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.instances: dict[str, Instance] = {}
        self.ensure_calls: list[tuple[str, dict[str, str]]] = []
        self.released: list[set[str]] = []

    def ensure_instance(self, image: ImageSource, labels: dict[str, str]) -> Instance:
        self.ensure_calls.append((image.meta_id, labels))
        if image.meta_id not in self.instances:
            mp = self.base / image.meta_id
            mp.mkdir(parents=True, exist_ok=True)
            self.instances[image.meta_id] = Instance(
                snapshot_id=image.meta_id, daemon_id="d1", image_ref=image.image_ref,
                bootstrap=image.bootstrap, mountpoint=mp, snapshot_dir=image.bootstrap.parent.parent,
            )
        return self.instances[image.meta_id]

    def get_instance(self, meta_id: str) -> Instance | None:
        return self.instances.get(meta_id)

    def release_unused(self, live_snapshot_ids: set[str]) -> None:
        self.released.append(set(live_snapshot_ids))
        for meta in list(self.instances):
            if meta not in live_snapshot_ids:
                del self.instances[meta]


def _nydus_image(stub: Any) -> None:
    """meta layer (bootstrap label) <- data layer: ids 1 and 2."""
    prepare_l(stub, "m", "", {L.NYDUS_BOOTSTRAP: "true", L.TARGET_SNAPSHOT_REF: "meta"})
    stub.Commit(pb.CommitSnapshotRequest(name="meta", key="m", labels={L.NYDUS_BOOTSTRAP: "true", "ml": "x"}))
    # an unpack layer above the meta layer gets native mounts: no image is resolved for it
    [m] = prepare_l(stub, "d", "meta", {L.TARGET_SNAPSHOT_REF: "data"})
    assert m.type == "overlay" and m.options[-1].endswith("/snapshots/1/fs")
    commit(stub, "data", "d")


def test_image_without_image_service_is_a_clear_error(start_snapshotter: Any) -> None:
    s = start_snapshotter(plugins=[FindTestImage()])
    _nydus_image(s.stub)
    msg = expect_code(C.FAILED_PRECONDITION, lambda: prepare(s.stub, "ctr", "data"))
    assert "no image service" in msg and "test image" in msg
    expect_code(C.NOT_FOUND, lambda: stat(s.stub, "ctr"))  # nothing half-made left behind
    prepare(s.stub, "plain")  # no parent: no image, works


def test_image_mounts_use_the_instance_mountpoint(start_snapshotter: Any, short_tmp: Path) -> None:
    finder = FindTestImage()
    images = DirImages(short_tmp / "mnt")
    s = start_snapshotter(plugins=[finder], images=images)
    stub, snaps = s.stub, s.root / "snapshots"
    _nydus_image(stub)
    [m] = prepare(stub, "ctr", "data")
    mp = short_tmp / "mnt" / "1"
    assert shape([m]) == [("overlay", "overlay",
                           [f"workdir={snaps}/3/work", f"upperdir={snaps}/3/fs", f"lowerdir={mp}"])]
    chain = finder.chains[-1]
    assert [(c.id, c.name) for c in chain] == [("2", "data"), ("1", "meta")]
    assert chain[1].upper == snaps / "1" / "fs"
    assert images.ensure_calls == [("1", {L.NYDUS_BOOTSTRAP: "true", "ml": "x", "from-source": "1"})]

    [v] = view(stub, "vw", "data")
    assert shape([v]) == [("overlay", "overlay", [f"lowerdir={mp}:{snaps}/4/fs"])]

    # Mounts re-resolves and reuses the live instance ...
    assert shape(mounts(stub, "ctr")) == shape([m])
    assert len(images.ensure_calls) == 2
    # ... and brings it back when it is gone (e.g. after a restart)
    images.instances.clear()
    assert shape(mounts(stub, "ctr")) == shape([m])
    assert len(images.ensure_calls) == 3

    vol = {L.OVERLAY_VOLATILE: "1"}
    [mv] = prepare(stub, "ctr-vol", "data", **vol)
    assert shape([mv])[0][2][0] == "volatile"

    remove(stub, "ctr")
    stub.Cleanup(pb.CleanupRequest())
    assert images.released[-1] == {"1", "2", "4", "5"}


def test_no_index_off_for_image_mounts() -> None:
    # upstream's mountRemote never adds index=off; guard the expectation above on this kernel
    assert OVERLAY_INDEX_PARAM.exists()


def test_failing_event_listener_does_not_fail_the_operation(start_snapshotter: Any) -> None:
    class Grumpy:
        @hookimpl
        def nydus_snapshot_committed(self, info: Info, remote: bool) -> None:
            raise RuntimeError("listener bug")

        @hookimpl
        def nydus_snapshot_removed(self, info: Info) -> None:
            raise RuntimeError("listener bug")

    s = start_snapshotter(plugins=[Grumpy()])
    prepare(s.stub, "a")
    commit(s.stub, "c", "a")
    assert stat(s.stub, "c").kind == pb.COMMITTED
    remove(s.stub, "c")
    expect_code(C.NOT_FOUND, lambda: stat(s.stub, "c"))


def test_removed_meta_snapshot_waits_for_its_instance(start_snapshotter: Any, short_tmp: Path) -> None:
    images = DirImages(short_tmp / "mnt")
    s = start_snapshotter(plugins=[FindTestImage()], images=images)
    stub, snaps = s.stub, s.root / "snapshots"
    _nydus_image(stub)
    prepare(stub, "ctr", "data")
    assert "1" in images.instances
    remove(stub, "ctr")
    remove(stub, "data")
    remove(stub, "meta")
    # the served meta snapshot's directory is not renamed while its image is mounted
    assert (snaps / "1").is_dir() and not (snaps / "rm-1").exists()
    assert (snaps / "rm-2").is_dir()
    stub.Cleanup(pb.CleanupRequest())
    assert images.released[-1] == set() and images.instances == {}
    assert os.listdir(snaps) == []


class MountingImages(DirImages):
    """Bind-mounts a source dir at ``snapshots/<meta>/mnt`` and, like a broken daemon manager,
    never unmounts it: Cleanup must detach it rather than delete through it."""

    def __init__(self, base: Path, snaps: Path) -> None:
        super().__init__(base)
        self.snaps = snaps

    def ensure_instance(self, image: ImageSource, labels: dict[str, str]) -> Instance:
        if image.meta_id not in self.instances:
            src = self.base / "rafs"
            src.mkdir(parents=True, exist_ok=True)
            (src / "precious").write_text("keep me")
            mp = self.snaps / image.meta_id / "mnt"
            mp.mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", str(src), str(mp)], check=True)
            self.instances[image.meta_id] = Instance(
                snapshot_id=image.meta_id, daemon_id="d1", image_ref=image.image_ref,
                bootstrap=image.bootstrap, mountpoint=mp, snapshot_dir=mp.parent,
            )
        return self.instances[image.meta_id]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_cleanup_never_deletes_through_a_live_mount(start_snapshotter: Any, short_tmp: Path) -> None:
    root = short_tmp / "mroot"
    images = MountingImages(short_tmp / "imgs", root / "snapshots")
    s = start_snapshotter(plugins=[FindTestImage()], images=images, root=root)
    stub, snaps = s.stub, root / "snapshots"
    try:
        _nydus_image(stub)
        [m] = prepare(stub, "ctr", "data")
        assert m.options[-1] == f"lowerdir={snaps}/1/mnt"
        assert (snaps / "1" / "mnt" / "precious").exists()
        for key in ("ctr", "data", "meta"):
            remove(stub, key)
        stub.Cleanup(pb.CleanupRequest())
        assert os.listdir(snaps) == []
        assert (short_tmp / "imgs" / "rafs" / "precious").read_text() == "keep me"
    finally:
        subprocess.run(["umount", "-l", str(snaps / "1" / "mnt")], capture_output=True)
