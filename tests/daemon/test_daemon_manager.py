"""The daemon manager and the core's `NydusdBackend` (as backend ``mini``), against real mini-nydusd
processes and mounts."""

from __future__ import annotations

import base64
import gc
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_helpers import EventRecorder, kill9, pid_alive, pids_mentioning

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.manager import DaemonManager, NoBackendError
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord
from nydus_core.control.daemons.mounts import is_mounted
from nydus_core.control.daemons.nydusd import NydusdBackend
from nydus_core.control.daemons.store import DaemonStore
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.errors import Unavailable
from nydus_core.plugins import NydusPluginManager

MakeConfig = Callable[..., SnapshotterConfig]
MakeImage = Callable[..., ImageSource]


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------------------
# dedicated mode
# ---------------------------------------------------------------------------------------------


def test_backend_start(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("7", {"etc/os-release": "mini\n"})
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None and daemon.mode is DaemonMode.DEDICATED
    assert len(daemon.id) == 20
    assert inst.mountpoint == root / "snapshots" / "7" / "mnt"
    assert is_mounted(inst.mountpoint)
    assert (inst.mountpoint / "etc" / "os-release").read_text() == "mini\n"
    # upstream's command line, flag by flag
    args = cmdline(daemon.pid)
    i = args.index("fuse")
    assert args[i:] == [
        "fuse",
        "--config", str(root / "config" / daemon.id / "config.json"),
        "--bootstrap", str(image.bootstrap),
        "--mountpoint", str(root / "snapshots" / "7" / "mnt"),
        "--apisock", str(root / "socket" / daemon.id / "api.sock"),
        "--log-level", "info",
        "--log-rotation-size", "100",
        "--log-file", str(root / "logs" / daemon.id / "nydusd.log"),
    ]  # fmt: skip
    # its own session: a signal to the snapshotter's process group does not reach it
    assert os.getsid(daemon.pid) == daemon.pid
    assert (root / "logs" / daemon.id / "nydusd.log").read_text().count("RUNNING") == 1
    # the record is persisted with the pid
    stored = DaemonStore(root / "nydus.db")
    assert stored.get_daemon(daemon.id) == daemon
    rec = stored.get_instance("7")
    assert rec is not None and rec.daemon_id == daemon.id and rec.seq >= 1
    # a second call reuses the instance
    assert mgr.ensure_instance(image, image.labels) is inst
    assert len(pids_mentioning(str(root / "socket"))) == 1


def test_backend_missing_is_a_clear_error(
    make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated", fs_driver="fscache"), pm)
    mgr.check_configuration()  # the default driver is not configured here: no start-up error
    image = make_image("3")
    with pytest.raises(NoBackendError) as exc:
        mgr.ensure_instance(image, image.labels)
    msg = str(exc.value)
    assert "fs_driver 'fscache' (needed for the nydus image of snapshot 3)" in msg
    assert "installed backends: mini" in msg  # lists what is installed
    assert "pip install 'nydus-core[erofs]'" in msg  # and what provides the missing one
    assert mgr.store.list_daemons() == [] and mgr.get_instance("3") is None


def test_backend_wait_ready(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The daemon stays in INIT for a while: ensure_instance must return only once it is RUNNING.
    monkeypatch.setenv("MINI_NYDUSD_READY_DELAY", "0.6")
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("11")
    t0 = time.monotonic()
    inst = mgr.ensure_instance(image, image.labels)
    assert time.monotonic() - t0 >= 0.6
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    with NydusdClient(daemon.api_socket) as c:
        assert c.state() == "RUNNING"
    assert (inst.mountpoint / "hello.txt").read_text() == "image 11\n"


def test_backend_wait_ready_timeout_discards_daemon(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MINI_NYDUSD_READY_DELAY", "30")
    mgr = DaemonManager(make_config("dedicated"), pm, ready_timeout=0.5)
    image = make_image("12")
    with pytest.raises(Unavailable, match=r"did not become ready within 0\.5s"):
        mgr.ensure_instance(image, image.labels)
    assert mgr.get_instance("12") is None
    assert mgr.store.list_daemons() == [] and mgr.store.list_instances() == []
    pids = pids_mentioning(str(root / "socket"))
    assert all(wait_gone(p) for p in pids)


def test_backend_stop(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    a, b = make_image("21"), make_image("22")
    ia = mgr.ensure_instance(a, a.labels)
    ib = mgr.ensure_instance(b, b.labels)
    da, db = mgr.daemon(ia.daemon_id), mgr.daemon(ib.daemon_id)
    assert da is not None and db is not None and da.pid != db.pid
    mgr.release_unused({"22"})
    assert not pid_alive(da.pid)
    assert not is_mounted(ia.mountpoint)
    assert not da.api_socket.exists() and not da.config_dir.exists()
    assert mgr.get_instance("21") is None and mgr.store.get_daemon(da.id) is None
    assert mgr.store.get_instance("21") is None
    assert "stopped" in events.names(da.id)
    # the other image is untouched
    assert pid_alive(db.pid) and (ib.mountpoint / "hello.txt").read_text() == "image 22\n"
    mgr.release_unused(set())
    assert not pid_alive(db.pid) and not is_mounted(ib.mountpoint)
    assert mgr.store.list_daemons() == []


def test_backend_stop_kills_with_sigkill_when_sigterm_ignored(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager, backend: NydusdBackend
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("23")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    os.kill(daemon.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    try:
        backend.stop(daemon)
    finally:
        if pid_alive(daemon.pid):
            os.kill(daemon.pid, signal.SIGCONT)
    assert not pid_alive(daemon.pid)
    assert not is_mounted(inst.mountpoint)  # the SIGKILLed daemon's bind mount was cleared


def test_concurrent_ensure_instance_starts_one_daemon(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MINI_NYDUSD_READY_DELAY", "0.3")
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("31")
    results: list[object] = []
    barrier = threading.Barrier(4)

    def prepare() -> None:
        barrier.wait()
        results.append(mgr.ensure_instance(image, image.labels))

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert len(mgr.store.list_daemons()) == 1
    assert len(pids_mentioning(str(root / "socket"))) == 1


def test_config_file_private_and_filled(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    labels = {L.PULL_USERNAME: "alice", L.PULL_SECRET: "s3cret"}
    image = make_image("41", ref="busybox", labels=labels)
    inst = mgr.ensure_instance(image, image.labels)
    assert inst.config_path == root / "config" / inst.daemon_id / "config.json"
    assert inst.config_path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(inst.config_path.read_text())
    backend = doc["device"]["backend"]
    assert backend["type"] == "registry"
    assert backend["config"]["host"] == "index.docker.io"
    assert backend["config"]["repo"] == "library/busybox"
    assert base64.b64decode(backend["config"]["auth"]) == b"alice:s3cret"
    assert "registry_token" not in backend["config"]
    assert doc["device"]["id"] == "/41"
    assert doc["device"]["cache"]["config"]["work_dir"] == str(root / "cache")
    # the secret is in no log line of the daemon
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    assert "s3cret" not in (daemon.log_dir / "nydusd.log").read_text()


def test_config_from_template_with_token(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    tmp_path: Path,
) -> None:
    template = tmp_path / "nydusd-config.json"
    template.write_text(json.dumps({
        "device": {"backend": {"type": "registry", "config": {"scheme": "http", "auth": "stale"}},
                   "cache": {"type": "blobcache", "config": {"work_dir": "/elsewhere"}}},
        "mode": "cached",
    }))  # fmt: skip
    config = make_config("shared")
    config.daemon.nydusd_config = template
    mgr = DaemonManager(config, pm)
    # an empty username means the secret is a token
    labels = {L.PULL_USERNAME: "", L.PULL_SECRET: "tok-123"}
    image = make_image("42", ref="localhost:5000/team/app:v1", labels=labels)
    inst = mgr.ensure_instance(image, image.labels)
    assert inst.config_path == root / "config" / inst.daemon_id / "42" / "config.json"
    assert inst.config_path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(inst.config_path.read_text())
    cfg = doc["device"]["backend"]["config"]
    assert (cfg["host"], cfg["repo"], cfg["scheme"]) == ("localhost:5000", "team/app", "http")
    assert cfg["registry_token"] == "tok-123" and "auth" not in cfg
    assert doc["mode"] == "cached"
    assert doc["device"]["cache"]["config"]["work_dir"] == str(root / "cache")
    # the daemon received exactly that config through POST /api/v1/mount
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    mounts = NydusdClient(daemon.api_socket)._json("GET", "/api/v1/mini/mounts")
    assert mounts["42"]["config"] == doc


# ---------------------------------------------------------------------------------------------
# shared mode
# ---------------------------------------------------------------------------------------------


def test_backend_attach(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("shared"), pm)
    a, b = make_image("51", {"a.txt": "A\n"}), make_image("52", {"b.txt": "B\n"})
    ia = mgr.ensure_instance(a, a.labels)
    ib = mgr.ensure_instance(b, b.labels)
    assert ia.daemon_id == ib.daemon_id
    daemon = mgr.daemon(ia.daemon_id)
    assert daemon is not None and daemon.mode is DaemonMode.SHARED
    assert daemon.mountpoint == root / "mnt"
    assert (ia.mountpoint, ib.mountpoint) == (root / "mnt" / "51", root / "mnt" / "52")
    assert (ia.mountpoint / "a.txt").read_text() == "A\n"
    assert (ib.mountpoint / "b.txt").read_text() == "B\n"
    assert ia.seq < ib.seq
    args = cmdline(daemon.pid)
    assert args[args.index("fuse"):][:5] == ["fuse", "--mountpoint", str(root / "mnt"), "--apisock",
                                             str(daemon.api_socket)]
    assert "--config" not in args and "--bootstrap" not in args
    assert len(pids_mentioning(str(root / "socket"))) == 1


def test_backend_detach(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager, backend: NydusdBackend
) -> None:
    mgr = DaemonManager(make_config("shared"), pm)
    a, b = make_image("61"), make_image("62")
    ia = mgr.ensure_instance(a, a.labels)
    ib = mgr.ensure_instance(b, b.labels)
    daemon = mgr.daemon(ia.daemon_id)
    assert daemon is not None
    mgr.release_unused({"61"})
    assert not is_mounted(ib.mountpoint) and not ib.mountpoint.exists()
    assert mgr.get_instance("62") is None and mgr.store.get_instance("62") is None
    assert ib.config_path is not None and not ib.config_path.parent.exists()
    assert (ia.mountpoint / "hello.txt").read_text() == "image 61\n"
    # the shared daemon keeps running even with no image left
    mgr.release_unused(set())
    assert not is_mounted(ia.mountpoint)
    assert pid_alive(daemon.pid) and backend.alive(daemon) is True
    # detaching an image the daemon does not have is not an error
    backend.detach(daemon, ia)


# ---------------------------------------------------------------------------------------------
# liveness and recovery
# ---------------------------------------------------------------------------------------------


def test_backend_alive(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager, backend: NydusdBackend
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("71")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    assert backend.alive(daemon) is True
    kill9(daemon.pid)
    assert backend.alive(daemon) is False
    # a driver nobody provides is a clear error, not a silent "not mine"
    with pytest.raises(NoBackendError, match="fs_driver 'virtiofs-xyz'"):
        mgr.backend("virtiofs-xyz")


def test_daemon_survives_manager_drop_and_is_adopted(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    config = make_config("dedicated")
    mgr = DaemonManager(config, pm)
    image = make_image("81")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    pid = daemon.pid
    mgr.close()
    del mgr
    gc.collect()
    time.sleep(0.2)
    assert pid_alive(pid), "dropping the manager must not stop the daemon"
    assert (inst.mountpoint / "hello.txt").read_text() == "image 81\n"
    # a new manager (snapshotter restart) re-adopts it: same pid, no new process
    events.events.clear()
    mgr2 = DaemonManager(config, pm)
    mgr2.recover()
    again = mgr2.get_instance("81")
    assert again is not None and again.daemon_id == daemon.id
    d2 = mgr2.daemon(daemon.id)
    assert d2 is not None and d2.pid == pid
    assert len(pids_mentioning(str(root / "socket"))) == 1
    assert events.names() == []
    assert mgr2.ensure_instance(image, image.labels) is again


def test_backend_recover(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    config = make_config("dedicated", recover_policy="restart")
    mgr = DaemonManager(config, pm)
    image = make_image("91")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    old_pid = daemon.pid
    mgr.close()
    kill9(old_pid)
    # SIGKILL leaves the mount and the socket behind, as a crashed FUSE daemon does
    assert is_mounted(inst.mountpoint) and daemon.api_socket.exists()
    events.events.clear()
    mgr2 = DaemonManager(config, pm)
    mgr2.recover()
    d2 = mgr2.daemon(daemon.id)
    assert d2 is not None and d2.pid != old_pid and pid_alive(d2.pid)
    assert events.names(daemon.id) == ["died", "recovered"]
    assert mgr2.store.get_daemon(daemon.id) == d2  # the new pid is persisted
    again = mgr2.get_instance("91")
    assert again is not None and again.mountpoint == inst.mountpoint
    assert (again.mountpoint / "hello.txt").read_text() == "image 91\n"
    # the stale mount was removed before the respawn: exactly one mount at the mountpoint
    with open("/proc/self/mountinfo") as f:
        assert [line.split()[4] for line in f].count(str(inst.mountpoint)) == 1
    assert cmdline(d2.pid)[cmdline(d2.pid).index("fuse"):] == \
        cmdline_expected(root, daemon, image.bootstrap)


def test_backend_reconcile(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
    backend: NydusdBackend,
) -> None:
    """A snapshotter killed mid-recovery left two unrecorded replacements: the one bound to the
    API socket is adopted (record, and no respawn), the stale one is killed (no orphan)."""
    config = make_config("dedicated", recover_policy="restart")
    mgr = DaemonManager(config, pm)
    image = make_image("95")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    dead = daemon.pid
    mgr.close()
    kill9(dead)
    # two spawns the dead snapshotter never recorded; each spawn takes the API socket over
    stale = daemon.pid = backend.spawn(daemon, inst)
    assert backend.wait_ready(daemon, 10)
    serving = daemon.pid = backend.spawn(daemon, inst)
    assert backend.wait_ready(daemon, 10)
    record = DaemonStore(root / "nydus.db").get_daemon(daemon.id)
    assert record is not None and record.pid == dead
    assert backend.reconcile(record) is True
    assert record.pid == serving
    assert not pid_alive(stale) and pid_alive(serving)
    assert backend.reconcile(record) is False  # already right
    # at start-up the manager does the same and persists it: adopted, nothing respawned
    mgr2 = DaemonManager(config, pm)
    events.events.clear()
    mgr2.recover()
    d2 = mgr2.daemon(daemon.id)
    assert d2 is not None and d2.pid == serving
    assert mgr2.store.get_daemon(daemon.id) == d2
    assert events.names(daemon.id) == []
    assert [p for p in pids_mentioning(str(daemon.api_socket)) if pid_alive(p)] == [serving]
    # no process at all: nothing to adopt
    kill9(serving)
    assert backend.reconcile(d2) is False and d2.pid == serving
    mgr2.close()


def cmdline_expected(root: Path, daemon: DaemonRecord, bootstrap: Path) -> list[str]:
    return [
        "fuse", "--config", str(root / "config" / daemon.id / "config.json"), "--bootstrap", str(bootstrap),
        "--mountpoint", str(daemon.mountpoint), "--apisock", str(daemon.api_socket), "--log-level", "info",
        "--log-rotation-size", "100", "--log-file", str(daemon.log_dir / "nydusd.log"),
    ]  # fmt: skip


def test_backend_recover_shared_reattaches_in_seq_order(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
) -> None:
    config = make_config("shared", recover_policy="restart")
    mgr = DaemonManager(config, pm)
    images = [make_image(sid, {"id": sid}) for sid in ("103", "101", "102")]
    for img in images:
        mgr.ensure_instance(img, img.labels)
    daemon = mgr.daemons()[0]
    mgr.close()
    kill9(daemon.pid)
    mgr2 = DaemonManager(config, pm)
    mgr2.recover()
    d2 = mgr2.daemon(daemon.id)
    assert d2 is not None and d2.pid != daemon.pid
    mounted = NydusdClient(d2.api_socket)._json("GET", "/api/v1/mini/mounts")
    assert sorted(mounted, key=lambda k: mounted[k]["order"]) == ["103", "101", "102"]
    for sid in ("101", "102", "103"):
        assert (root / "mnt" / sid / "id").read_text() == sid
    # new images go to the recovered daemon, not a second one
    extra = make_image("104")
    assert mgr2.ensure_instance(extra, extra.labels).daemon_id == daemon.id
    assert len(pids_mentioning(str(root / "socket"))) == 1


def test_recover_policy_none_forgets_dead_daemon(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    config = make_config("dedicated", recover_policy="none")
    mgr = DaemonManager(config, pm)
    image = make_image("111")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    mgr.close()
    kill9(daemon.pid)
    events.events.clear()
    mgr2 = DaemonManager(config, pm)
    mgr2.recover()
    assert mgr2.get_instance("111") is None and mgr2.daemons() == []
    assert mgr2.store.list_daemons() == [] and mgr2.store.list_instances() == []
    assert not is_mounted(inst.mountpoint) and not daemon.api_socket.exists()
    assert pids_mentioning(str(root / "socket")) == []
    assert events.names(daemon.id) == ["died", "stopped"]
    # the image can be served again afterwards, by a new daemon
    inst2 = mgr2.ensure_instance(image, image.labels)
    assert inst2.daemon_id != daemon.id
    assert (inst2.mountpoint / "hello.txt").read_text() == "image 111\n"


def test_check_liveness_respawns_dead_daemon(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated", recover_policy="restart"), pm)
    image = make_image("121")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    old = daemon.pid
    assert mgr.check_liveness() == []
    kill9(old)
    assert mgr.check_liveness() == [daemon.id]
    d2 = mgr.daemon(daemon.id)
    assert d2 is not None and d2.pid != old
    assert (inst.mountpoint / "hello.txt").read_text() == "image 121\n"


def test_nydus_daemon_event(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("131")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    assert events.names(daemon.id) == ["started", "ready"]
    assert events.events[0][2] == {"pid": daemon.pid}
    mgr.release_unused(set())
    assert events.names(daemon.id) == ["started", "ready", "stopped"]


def test_daemon_mode_none_needs_no_daemon(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("none"), pm)
    image = make_image("141")
    inst = mgr.ensure_instance(image, image.labels)
    assert inst.daemon_id == "" and inst.mountpoint == root / "snapshots" / "141" / "fs"
    assert mgr.daemons() == [] and pids_mentioning(str(root / "socket")) == []
    mgr.release_unused(set())
    assert mgr.get_instance("141") is None


def test_nydusd_command_line_needs_program(
    root: Path, make_config: MakeConfig, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("shared"), pm)
    daemon = DaemonRecord(
        id="abc", fs_driver="mini", mode=DaemonMode.SHARED, api_socket=root / "s" / "api.sock",
        mountpoint=root / "mnt", config_dir=root / "c", log_dir=root / "l", program="no-such-nydusd-xyz",
    )  # fmt: skip
    backend = mgr.backend("mini").backend
    assert isinstance(backend, NydusdBackend)
    with pytest.raises(Exception, match="nydusd program 'no-such-nydusd-xyz' not found"):
        backend.command_line(daemon, None)


def test_ensure_instance_revives_dead_daemon(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated", recover_policy="restart"), pm)
    image = make_image("151")
    inst = mgr.ensure_instance(image, image.labels)
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None
    old = daemon.pid
    kill9(old)
    again = mgr.ensure_instance(image, image.labels)
    assert again.daemon_id == daemon.id and again.mountpoint == inst.mountpoint
    d2 = mgr.daemon(daemon.id)
    assert d2 is not None and d2.pid != old and pid_alive(d2.pid)
    assert (again.mountpoint / "hello.txt").read_text() == "image 151\n"


def test_dead_shared_daemon_forgotten_then_replaced(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    mgr = DaemonManager(make_config("shared", recover_policy="none"), pm)
    a = make_image("161")
    ia = mgr.ensure_instance(a, a.labels)
    first = mgr.daemon(ia.daemon_id)
    assert first is not None
    kill9(first.pid)
    ib = mgr.ensure_instance(a, a.labels)  # forgotten under "none": a new shared daemon serves it
    assert ib.daemon_id != first.id
    assert [d.id for d in mgr.daemons()] == [ib.daemon_id]
    assert events.names(first.id)[-2:] == ["died", "stopped"]
    assert (root / "mnt" / "161" / "hello.txt").read_text() == "image 161\n"
    assert len(pids_mentioning(str(root / "socket"))) == 1


def test_liveness_monitor_respawns(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    pm: NydusPluginManager,
    events: EventRecorder,
) -> None:
    mgr = DaemonManager(make_config("shared", recover_policy="restart"), pm)
    try:
        image = make_image("171")
        inst = mgr.ensure_instance(image, image.labels)
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None
        old = daemon.pid
        mgr.start_liveness_monitor(interval=0.1)
        kill9(old)
        deadline = time.monotonic() + 10
        while "recovered" not in events.names(daemon.id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events.names(daemon.id)[-2:] == ["died", "recovered"]
        d2 = mgr.daemon(daemon.id)
        assert d2 is not None and d2.pid != old
        assert (inst.mountpoint / "hello.txt").read_text() == "image 171\n"
    finally:
        mgr.close()
    assert mgr._monitor is None


def test_daemon_exiting_at_start_is_reported_at_once(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm, ready_timeout=30)
    image = make_image("181")
    image.bootstrap.write_text("not a bootstrap the mini daemon can read")
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"exited with status 1 before it was ready; see its log in"):
        mgr.ensure_instance(image, image.labels)
    assert time.monotonic() - t0 < 10
    assert mgr.store.list_daemons() == [] and mgr.get_instance("181") is None
    assert not is_mounted(root / "snapshots" / "181" / "mnt")


def test_blob_meta_copied_to_cache_and_version_recorded(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("dedicated"), pm)
    image = make_image("191")
    blob_meta = image.bootstrap.parent / ("ab" * 32 + ".blob.meta")
    blob_meta.write_bytes(b"\x01meta")
    inst = mgr.ensure_instance(image, image.labels)
    assert (root / "cache" / blob_meta.name).read_bytes() == b"\x01meta"
    daemon = mgr.daemon(inst.daemon_id)
    assert daemon is not None and daemon.version == "mini-0.1.0"
    stored = mgr.store.get_daemon(daemon.id)
    assert stored is not None and stored.version == "mini-0.1.0"


def test_new_image_on_dead_shared_daemon_recovers_it_first(
    root: Path, make_config: MakeConfig, make_image: MakeImage, pm: NydusPluginManager
) -> None:
    mgr = DaemonManager(make_config("shared", recover_policy="restart"), pm)
    a, b = make_image("201", {"a": "A"}), make_image("202", {"b": "B"})
    ia = mgr.ensure_instance(a, a.labels)
    daemon = mgr.daemon(ia.daemon_id)
    assert daemon is not None
    old = daemon.pid
    kill9(old)
    ib = mgr.ensure_instance(b, b.labels)
    assert ib.daemon_id == daemon.id and daemon.pid != old
    assert (root / "mnt" / "201" / "a").read_text() == "A"  # re-attached by the recovery
    assert (root / "mnt" / "202" / "b").read_text() == "B"
    assert len(pids_mentioning(str(root / "socket"))) == 1
