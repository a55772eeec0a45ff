"""16 concurrent clients against one server, and the unix-socket server's own contract."""

from __future__ import annotations

import os
import socket
import stat as st
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Served
from snap_helpers import commit, list_names, prepare, remove, stat, usage, view

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.server import serve
from nydus_core.control.snapshot.snapshotter import Snapshotter
from nydus_core.plugins import build_plugin_manager


def test_sixteen_clients_prepare_commit_remove(served: Served) -> None:
    stub = served.stub
    prepare(stub, "b")
    commit(stub, "base", "b")
    errors: list[BaseException] = []
    seen_upper: list[str] = []
    lock = threading.Lock()
    rounds = 8

    def client(n: int) -> None:
        # each thread has its own channel, like separate containerd connections
        with grpc.insecure_channel(f"unix://{served.socket}") as ch:
            s = pb_grpc.SnapshotsStub(ch)
            try:
                for r in range(rounds):
                    key = f"k8s.io/{n}/extract-{r} sha256:{n}-{r}"
                    [m] = prepare(s, key, "base")
                    upper = next(o for o in m.options if o.startswith("upperdir="))
                    Path(upper.split("=", 1)[1], "f").write_text(key)
                    with lock:
                        seen_upper.append(upper)
                    commit(s, f"layer-{n}-{r}", key)
                    view(s, f"view-{n}-{r}", f"layer-{n}-{r}")
                    assert usage(s, f"layer-{n}-{r}")[1] == 2
                    list_names(s, f"name==layer-{n}-{r}")
                    remove(s, f"view-{n}-{r}")
                    if r % 2:
                        remove(s, f"layer-{n}-{r}")
            except BaseException as exc:  # report in the main thread
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert errors == []
    assert len(set(seen_upper)) == 16 * rounds  # every snapshot got its own id
    remaining = list_names(stub)
    assert remaining == sorted(["base"] + [f"layer-{n}-{r}" for n in range(16) for r in range(0, rounds, 2)])
    stub.Cleanup(pb.CleanupRequest())
    ids = {served.snapshotter.ms.get(name).id for name in remaining}
    assert set(os.listdir(served.root / "snapshots")) == ids  # directories match records exactly
    for name in remaining[1:]:
        assert stat(stub, name).parent == "base"
    assert elapsed < 60


def test_socket_permissions_owner_and_stale_socket(short_tmp: Path) -> None:
    root = short_tmp / "root"
    sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
    sock = short_tmp / "run" / "sub" / "nydus.sock"
    # a stale socket from a previous run is replaced
    sock.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    gid = 4242
    server = serve(sn, sock, uid=0, gid=gid)
    try:
        info = os.stat(sock)
        assert st.S_ISSOCK(info.st_mode)
        assert st.S_IMODE(info.st_mode) == 0o660
        assert (info.st_uid, info.st_gid) == (0, gid)
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            prepare(pb_grpc.SnapshotsStub(ch), "a")
    finally:
        t0 = time.monotonic()
        server.stop(10.0)  # a long grace is capped: stop returns within a second
        assert time.monotonic() - t0 < 1.0
        sn.close()
    assert not sock.exists()


def test_socket_path_never_refuses_a_dial_as_serving_starts_and_stops(short_tmp: Path) -> None:
    """containerd dials a missing socket again every 10 ms but backs off for a second or more
    after "connection refused": the address must name a listening socket from the moment it
    exists (a bind, then a listen, at the address itself refuses in between) until it is gone
    (closed, then unlinked, it refuses in between), and a stale one is replaced."""
    root = short_tmp / "root"
    sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
    sock = short_tmp / "nydus.sock"
    seen: dict[str, int] = {}
    done = threading.Event()

    def dial() -> None:
        while not done.is_set():
            with socket.socket(socket.AF_UNIX) as c:
                c.setblocking(False)
                try:
                    c.connect(str(sock))
                    outcome = "ok"
                except OSError as e:
                    outcome = type(e).__name__
            seen[outcome] = seen.get(outcome, 0) + 1

    prober = threading.Thread(target=dial)
    prober.start()
    try:
        for _ in range(100):
            server = serve(sn, sock)
            server.stop(0)
        refused = seen.get("ConnectionRefusedError", 0)
        stale = socket.socket(socket.AF_UNIX)  # what a snapshotter killed -9 leaves: it refuses
        stale.bind(str(sock))
        stale.close()
        server = serve(sn, sock)  # replaced by a listening one
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(sock))
        server.stop(0)
    finally:
        done.set()
        prober.join()
        sn.close()
    assert refused == 0, seen
    assert seen.get("ok", 0) > 0, seen
    assert sorted(os.listdir(short_tmp)) == ["root"]  # no staged socket left behind


def test_long_socket_path_is_bound_in_place(short_tmp: Path) -> None:
    """No room beside a long address for the staged name: bound at the address itself."""
    root = short_tmp / "root"
    sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
    sock = short_tmp / ("s" * (104 - len(str(short_tmp))))
    assert len(str(sock)) == 105  # grpc's limit
    server = serve(sn, sock)
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            prepare(pb_grpc.SnapshotsStub(ch), "a")
    finally:
        server.stop(0)
        sn.close()
    assert not sock.exists()


def test_parent_dir_is_created_private(short_tmp: Path) -> None:
    root = short_tmp / "root"
    sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
    sock = short_tmp / "newdir" / "s.sock"
    server = serve(sn, sock)
    try:
        assert st.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    finally:
        server.stop(0)
        sn.close()


def test_refuses_to_replace_a_regular_file(short_tmp: Path) -> None:
    root = short_tmp / "root"
    sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
    path = short_tmp / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        serve(sn, path)
    assert path.read_text() == "precious"
    sn.close()


def test_stop_with_a_call_in_flight(start_snapshotter: Any) -> None:
    from nydus_core.hookspecs import hookimpl

    release = threading.Event()

    class Slow:
        @hookimpl
        def nydus_mounts(self, request, config):  # type: ignore[no-untyped-def]
            release.wait(5)
            return None

    s = start_snapshotter(plugins=[Slow()])
    fut = s.stub.Prepare.future(pb.PrepareSnapshotRequest(key="slow"))
    time.sleep(0.2)
    t0 = time.monotonic()
    s.server.stop(3.0)
    assert time.monotonic() - t0 < 1.0
    release.set()
    with pytest.raises(grpc.RpcError):
        fut.result(timeout=5)
