"""containerd bolt-storage semantics, checked through the real gRPC API."""

from __future__ import annotations

import os
import time

import grpc
import pytest
from conftest import Served
from snap_helpers import (
    commit,
    expect_code,
    mounts,
    prepare,
    remove,
    shape,
    stat,
    update,
    usage,
    view,
)

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

C = grpc.StatusCode


def _ns(ts: object) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos  # type: ignore[attr-defined]


def test_ids_are_kept_across_commit_and_never_reused(served: Served) -> None:
    stub = served.stub
    root = served.root
    [m] = prepare(stub, "k8s.io/1/extract a")  # keys are opaque: slashes and spaces
    assert m.source == f"{root}/snapshots/1/fs"
    commit(stub, "layer-1", "k8s.io/1/extract a")
    assert (root / "snapshots" / "1" / "fs").is_dir()
    [m] = prepare(stub, "ctr", "layer-1")
    assert f"lowerdir={root}/snapshots/1/fs" in m.options  # the committed snapshot kept id 1
    assert f"upperdir={root}/snapshots/2/fs" in m.options
    remove(stub, "ctr")
    [m] = prepare(stub, "ctr2", "layer-1")
    assert f"upperdir={root}/snapshots/3/fs" in m.options  # id 2 is never handed out again


def test_active_dirs_and_modes(served: Served) -> None:
    prepare(served.stub, "a")
    view(served.stub, "v")
    a, v = served.root / "snapshots" / "1", served.root / "snapshots" / "2"
    assert (a / "fs").stat().st_mode & 0o7777 == 0o755
    assert (a / "work").is_dir()
    assert (v / "fs").is_dir() and not (v / "work").exists()


def test_labels_replaced_on_commit_and_timestamps(served: Served) -> None:
    stub = served.stub
    prepare(stub, "a", "", keep="no", other="x")
    info = stat(stub, "a")
    assert info.kind == pb.ACTIVE
    assert dict(info.labels) == {"keep": "no", "other": "x"}
    assert _ns(info.created_at) == _ns(info.updated_at) > 0
    time.sleep(0.01)
    commit(stub, "c", "a", fresh="yes")
    info2 = stat(stub, "c")
    assert info2.kind == pb.COMMITTED
    assert dict(info2.labels) == {"fresh": "yes"}  # no inheritance
    # bolt resets both timestamps at commit time
    assert _ns(info2.created_at) == _ns(info2.updated_at) > _ns(info.created_at)
    expect_code(C.NOT_FOUND, lambda: stat(stub, "a"))  # the active key is gone
    time.sleep(0.01)
    info3 = update(stub, "c", {"z": "1"}, ["labels.z"])
    assert _ns(info3.created_at) == _ns(info2.created_at)
    assert _ns(info3.updated_at) > _ns(info2.updated_at)
    assert _ns(stat(stub, "c").updated_at) == _ns(info3.updated_at)


def test_kinds_and_parent_field(served: Served) -> None:
    stub = served.stub
    prepare(stub, "a")
    commit(stub, "base", "a")
    prepare(stub, "act", "base")
    view(stub, "vw", "base")
    assert stat(stub, "base").kind == pb.COMMITTED and stat(stub, "base").parent == ""
    assert stat(stub, "act").kind == pb.ACTIVE and stat(stub, "act").parent == "base"
    assert stat(stub, "vw").kind == pb.VIEW and stat(stub, "vw").parent == "base"


def test_parent_chain_is_lowerdir_order(served: Served) -> None:
    stub = served.stub
    parent = ""
    for i in range(1, 4):
        prepare(stub, f"x{i}", parent)
        commit(stub, f"l{i}", f"x{i}")
        parent = f"l{i}"
    [m] = prepare(stub, "top", "l3")
    r = served.root / "snapshots"
    assert m.options[-1] == f"lowerdir={r}/3/fs:{r}/2/fs:{r}/1/fs"


def test_usage_active_walks_and_committed_is_stored(served: Served) -> None:
    stub = served.stub
    prepare(stub, "a")
    upper = served.root / "snapshots" / "1" / "fs"
    size0, inodes0 = usage(stub, "a")
    assert inodes0 == 1  # the upper dir itself
    (upper / "f").write_bytes(b"x" * 10000)
    os.link(upper / "f", upper / "hardlink")  # counted once
    (upper / "d").mkdir()
    size1, inodes1 = usage(stub, "a")
    assert inodes1 == 3
    st = (upper / "f").stat()
    assert size1 - size0 >= st.st_blocks * 512 >= 10000
    commit(stub, "c", "a")
    assert usage(stub, "c") == (size1, inodes1)
    (upper / "later").write_bytes(b"y" * 50000)
    assert usage(stub, "c") == (size1, inodes1)  # stored at commit, not recomputed
    view(stub, "v", "c")
    assert usage(stub, "v") == (0, 0)


def test_status_codes(served: Served) -> None:
    stub = served.stub
    prepare(stub, "a")
    msg = expect_code(C.ALREADY_EXISTS, lambda: prepare(stub, "a"))
    assert "a" in msg
    msg = expect_code(C.NOT_FOUND, lambda: prepare(stub, "b", "nope"))
    assert 'missing parent "nope"' in msg
    expect_code(C.INVALID_ARGUMENT, lambda: prepare(stub, "b", "a"))  # parent not committed
    expect_code(C.NOT_FOUND, lambda: stat(stub, "nope"))
    expect_code(C.NOT_FOUND, lambda: remove(stub, "nope"))
    expect_code(C.NOT_FOUND, lambda: commit(stub, "x", "nope"))
    expect_code(C.NOT_FOUND, lambda: mounts(stub, "nope"))
    expect_code(C.NOT_FOUND, lambda: usage(stub, "nope"))
    commit(stub, "c", "a")
    prepare(stub, "a2")
    expect_code(C.ALREADY_EXISTS, lambda: commit(stub, "c", "a2"))  # name taken
    prepare(stub, "child", "c")
    msg = expect_code(C.FAILED_PRECONDITION, lambda: remove(stub, "c"))
    assert "remove" in msg
    view(stub, "v", "c")
    msg = expect_code(C.FAILED_PRECONDITION, lambda: commit(stub, "vc", "v"))
    assert "is not active" in msg
    expect_code(C.FAILED_PRECONDITION, lambda: mounts(stub, "c"))  # containerd 1.6: committed
    expect_code(C.INVALID_ARGUMENT, lambda: update(stub, "c", {}, ["parent"]))
    expect_code(C.INVALID_ARGUMENT, lambda: update(stub, "c", {}, ["name"]))
    expect_code(C.NOT_FOUND, lambda: update(stub, "nope", {}, ["labels"]))
    expect_code(C.INVALID_ARGUMENT, lambda: prepare(stub, ""))
    expect_code(C.INVALID_ARGUMENT, lambda: commit(stub, "", "a2"))
    # a failed call changed nothing
    assert stat(stub, "c").kind == pb.COMMITTED
    remove(stub, "child")
    remove(stub, "v")
    remove(stub, "c")
    expect_code(C.NOT_FOUND, lambda: stat(stub, "c"))


def test_update_masks(served: Served) -> None:
    stub = served.stub
    prepare(stub, "a", "", a="1", b="2")
    info = update(stub, "a", {"c": "3"}, ["labels"])
    assert dict(info.labels) == {"c": "3"}
    info = update(stub, "a", {"d": "4", "ignored": "x"}, ["labels.d"])
    assert dict(info.labels) == {"c": "3", "d": "4"}
    info = update(stub, "a", {}, ["labels.c"])  # absent in the request: deleted
    assert dict(info.labels) == {"d": "4"}
    info = update(stub, "a", {"k/with.dots": "v"}, ["labels.k/with.dots"])
    assert dict(info.labels) == {"d": "4", "k/with.dots": "v"}
    info = update(stub, "a", {"only": "this"}, None)  # no mask: all mutable fields
    assert dict(info.labels) == {"only": "this"}
    info = update(stub, "a", {"e": "5"}, [])  # empty mask: same
    assert dict(info.labels) == {"e": "5"}
    assert dict(stat(stub, "a").labels) == {"e": "5"}
    assert stat(stub, "a").kind == pb.ACTIVE  # kind untouched whatever the request said
    expect_code(C.INVALID_ARGUMENT, lambda: update(stub, "a", {}, ["labels", "kind"]))
    assert dict(stat(stub, "a").labels) == {"e": "5"}  # the failed update was rolled back


def test_list_batches_of_100(served: Served) -> None:
    stub: pb_grpc.SnapshotsStub = served.stub
    for i in range(250):
        view(stub, f"v{i:03d}")
    sizes = [len(r.info) for r in stub.List(pb.ListSnapshotsRequest())]
    assert sizes == [100, 100, 50]
    assert list(stub.List(pb.ListSnapshotsRequest(filters=["name==none"]))) == []


def test_remove_defers_directory_until_cleanup(served: Served) -> None:
    stub = served.stub
    prepare(stub, "a")
    remove(stub, "a")
    snaps = served.root / "snapshots"
    assert not (snaps / "1").exists()
    assert (snaps / "rm-1").is_dir()  # Remove only touches metadata (sync_remove off)
    served.stub.Cleanup(pb.CleanupRequest())
    assert not (snaps / "rm-1").exists()


def test_sync_remove_deletes_at_once(start_snapshotter, short_tmp) -> None:  # type: ignore[no-untyped-def]
    from nydus_core.config import SnapshotterConfig

    root = short_tmp / "sync"
    cfg = SnapshotterConfig(root=root)
    cfg.snapshot.sync_remove = True
    s = start_snapshotter(config=cfg, root=root)
    prepare(s.stub, "a")
    remove(s.stub, "a")
    assert os.listdir(root / "snapshots") == []


def test_cleanup_removes_orphans_only(served: Served) -> None:
    stub = served.stub
    prepare(stub, "keep")
    snaps = served.root / "snapshots"
    # what a kill -9 at various instants leaves behind
    for name in ("new-123abc", "rm-77", "99"):
        (snaps / name / "fs").mkdir(parents=True)
        (snaps / name / "fs" / "file").write_text("x")
    stub.Cleanup(pb.CleanupRequest())
    assert sorted(os.listdir(snaps)) == ["1"]
    assert stat(stub, "keep").kind == pb.ACTIVE


def test_interrupted_remove_is_rolled_back_on_restart(start_snapshotter, short_tmp) -> None:  # type: ignore[no-untyped-def]
    root = short_tmp / "crash"
    s = start_snapshotter(root=root)
    prepare(s.stub, "a")
    s.channel.close()
    s.server.stop(0)
    s.snapshotter.close()
    # the process died after renaming the directory but before committing the removal
    os.rename(root / "snapshots" / "1", root / "snapshots" / "rm-1")
    s2 = start_snapshotter(root=root)
    assert stat(s2.stub, "a").kind == pb.ACTIVE
    assert (root / "snapshots" / "1" / "fs").is_dir()
    s2.stub.Cleanup(pb.CleanupRequest())
    assert (root / "snapshots" / "1" / "fs").is_dir()


def test_stale_id_dir_from_crash_does_not_block_prepare(served: Served) -> None:
    # A crash after the rename but before the commit leaves snapshots/<id> while the id
    # sequence rolled back: the next Prepare gets that id again and must still succeed.
    snaps = served.root / "snapshots"
    (snaps / "1" / "fs").mkdir(parents=True)
    (snaps / "1" / "fs" / "stale").write_text("x")
    [m] = prepare(served.stub, "a")
    assert m.source == f"{snaps}/1/fs"
    assert os.listdir(snaps / "1" / "fs") == []


def test_metadata_persists_across_restart(start_snapshotter, short_tmp) -> None:  # type: ignore[no-untyped-def]
    root = short_tmp / "persist"
    s = start_snapshotter(root=root)
    prepare(s.stub, "a", "", l="1")
    commit(s.stub, "c", "a", l="2")
    s.server.stop(0)
    s.snapshotter.close()
    s2 = start_snapshotter(root=root)
    info = stat(s2.stub, "c")
    assert dict(info.labels) == {"l": "2"}
    [m] = prepare(s2.stub, "b", "c")
    assert f"upperdir={root}/snapshots/2/fs" in m.options
    assert (root / "metadata.db").exists()


def test_internal_error_from_a_plugin(start_snapshotter) -> None:  # type: ignore[no-untyped-def]
    from nydus_core.hookspecs import hookimpl

    class Broken:
        @hookimpl
        def nydus_mounts(self, request, config):  # type: ignore[no-untyped-def]
            raise RuntimeError("plugin exploded")

    s = start_snapshotter(plugins=[Broken()])
    msg = expect_code(C.INTERNAL, lambda: prepare(s.stub, "a"))
    assert "plugin exploded" in msg
    # the failed Prepare left nothing behind: the same key works once the plugin is gone
    s.snapshotter.pm.unregister(name=s.snapshotter.pm.get_name(next(
        p for p in s.snapshotter.pm.get_plugins() if isinstance(p, Broken))))
    assert shape(prepare(s.stub, "a"))[0][0] == "bind"


@pytest.mark.parametrize("n", [3])
def test_snapshotter_request_field_is_ignored(served: Served, n: int) -> None:
    for i in range(n):
        served.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=f"whatever{i}", key=f"k{i}"))
    assert stat(served.stub, "k2").kind == pb.ACTIVE
