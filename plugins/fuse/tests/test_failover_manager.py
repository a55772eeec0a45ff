"""`recover_policy` end to end through the `DaemonManager` and the default fusedev hooks (root).

``failover``: the manager runs a supervisor per daemon, the liveness monitor notices a kill -9
(pidfd) and the builtin recover hook spawns a replacement that takes the live FUSE session over:
readers that keep files open and readers that open new ones see no error and right bytes.

``failover_standby``: the next daemon generation waits in INIT ahead of the kill and is the
one that takes over (its pid and socket end up in the record in nydus.db); no standby outlives
its daemon.

``restart``: what running containers see is documented by assertion: a file opened before the
kill fails with ENOTCONN (the old FUSE connection is gone with its mount), while opens after the
respawn work again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from fuse_helpers import fuse_pm, fusedev, with_standby
from nydus_fuse.backend import standby as standbys
from nydus_fuse.backend.client import FuseSessionClient
from nydus_fuse.backend.crash_loop import CrashLoopBreaker
from test_nydusd_py_manager import _config, _meta

from nydus_core.control.daemons.manager import DaemonManager
from nydus_core.control.daemons.model import DaemonRecord
from nydus_core.control.daemons.mounts import is_mounted
from nydus_core.testing.images import build_image
from nydus_core.testing.services import live_pids_mentioning, process_alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")

BIG = os.urandom((2 << 20) + 777)
KILLS = 5


READER = Path(__file__).with_name("failover_reader.py")


def _start_load(mnt: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Readers in their own process (see failover_reader.py for why not threads here)."""
    want = hashlib.sha256(BIG).hexdigest()
    argv = [sys.executable, str(READER), str(mnt), want, str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


def _load_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    result: dict[str, Any] = json.loads(out)
    return result


def _standby_in_init(daemon: DaemonRecord, timeout: float = 30.0) -> standbys.Standby:
    """Wait until `daemon`'s standby is recorded and warm (INIT, imports done, image open)."""
    deadline = time.monotonic() + timeout
    while True:
        found = standbys.recorded(daemon)
        if found is not None and standbys.runs(found.pid, found.api_socket) and standbys.is_warm(found):
            return found
        assert time.monotonic() < deadline, f"no warm standby of daemon {daemon.id}"
        time.sleep(0.01)


@pytest.mark.parametrize("standby", [False, True], ids=["cold", "standby"])
@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_failover_policy_keeps_readers_going(mode: str, standby: bool, root: Path) -> None:
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    base = _config(root, img.blob_dir, mode)
    failover = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    config = with_standby(failover, standby)
    pm = fuse_pm()
    mgr = DaemonManager(config, pm)
    load = None
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "21", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None and fusedev(pm).supervisor_path(daemon) is not None
        assert fusedev(pm).session_holder is not None
        sup = fusedev(pm).session_holder.get(daemon.id)
        assert sup is not None and sup.has_state
        mgr.start_liveness_monitor(interval=5.0)
        load = _start_load(inst.mountpoint, 0.6 + KILLS * 0.8)
        time.sleep(0.3)
        took = []
        for _ in range(KILLS):
            old = daemon.pid
            expected = _standby_in_init(daemon) if standby else None
            if not standby:
                assert standbys.recorded(daemon) is None
            t = time.monotonic()
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                d = mgr.daemon(inst.daemon_id)
                if d is not None and d.pid != old and fusedev(pm).alive(d):
                    break
                assert time.monotonic() < deadline, "no failover within 20 s"
                time.sleep(0.005)
            took.append(time.monotonic() - t)
            daemon = d
            if expected is not None:  # the standby took over, and the record says so
                assert (d.pid, d.api_socket) == (expected.pid, expected.api_socket)
                (saved,) = [r for r in mgr.store.list_daemons() if r.id == d.id]
                assert (saved.pid, saved.api_socket) == (expected.pid, expected.api_socket)
            time.sleep(0.3)
        result = _load_result(load)
        assert not result["errors"], result
        assert result["ops"] > KILLS
        assert mgr.get_instance("21") is not None
        label = f"{mode}, {'standby' if standby else 'cold'}"
        print(
            f"\n[manager failover {label}] {KILLS} kill -9: kill->RUNNING max {max(took) * 1000:.0f} ms, "
            f"longest reader op {result['max_pause'] * 1000:.0f} ms, {result['ops']} reader ops, no error"
        )
        mgr.release_unused(set())
        assert not is_mounted(inst.mountpoint)
        if mode == "shared":
            mgr.stop_liveness_monitor()  # the stop below bypasses the manager: no failover of it
            (shared,) = mgr.daemons()
            fusedev(pm).stop(shared)
        time.sleep(0.2)  # a standby spawn that was under way at the stop
        assert _daemons_left(root) == [], "a daemon or standby outlived its stop"
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mgr.close()


def test_restart_policy_breaks_open_files_but_serves_new_opens(root: Path) -> None:
    img = build_image(root / "build", {"big": BIG})
    config = _config(root, img.blob_dir, "dedicated")
    assert config.daemon.recover_policy == "restart"
    pm = fuse_pm()
    mgr = DaemonManager(config, pm)
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "31", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None
        fd = os.open(inst.mountpoint / "big", os.O_RDONLY)
        try:
            os.kill(daemon.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while fusedev(pm).alive(daemon) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert mgr.check_liveness() == [daemon.id]
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            with pytest.raises(OSError) as err:
                os.pread(fd, 4096, 0)
            assert err.value.errno == errno.ENOTCONN  # what a running container sees
        finally:
            with contextlib.suppress(OSError):  # close reports ENOTCONN too (the FLUSH fails)
                os.close(fd)
        assert (inst.mountpoint / "big").read_bytes() == BIG  # new containers are served
        mgr.release_unused(set())
    finally:
        mgr.close()


def test_request_that_kills_every_daemon_ends_as_eio(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash-loop breaker: reading /poison kills the daemon (fault injection); after three deaths
    with it in flight the replacement answers it EIO, and the other readers never see an error."""
    files = {"big": BIG, "poison": b"p" * 10000, **{f"d/f{i}": str(i).encode() * i for i in range(10)}}
    img = build_image(root / "build", files)
    base = _config(root, img.blob_dir, "dedicated")
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    monkeypatch.setenv("NYDUSD_PY_CRASH_ON_READ", "/poison")
    pm = fuse_pm()
    mgr = DaemonManager(config, pm)
    load = None
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "41", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None and fusedev(pm).session_holder is not None
        sup = fusedev(pm).session_holder.get(daemon.id)
        assert sup is not None
        mgr.start_liveness_monitor(interval=5.0)
        load = _start_load(inst.mountpoint, 6.0)
        t = time.monotonic()
        poison = [sys.executable, str(READER), "--read", str(inst.mountpoint / "poison")]
        out = subprocess.run(poison, capture_output=True, timeout=60, check=True).stdout
        assert json.loads(out)["errno"] == errno.EIO
        took = time.monotonic() - t
        log = daemon.log_dir / "nydusd.log"
        deaths = log.read_text().count(" starting: ") - 1  # every death was followed by a spawn
        assert deaths == 3, log.read_text()
        out = subprocess.run(poison, capture_output=True, timeout=60, check=True).stdout
        assert json.loads(out)["errno"] == errno.EIO  # at once now, no more deaths
        assert log.read_text().count(" starting: ") - 1 == deaths
        result = _load_result(load)
        assert not result["errors"], result
        d = mgr.daemon(inst.daemon_id)
        assert d is not None and fusedev(pm).alive(d)
        assert (inst.mountpoint / "big").read_bytes() == BIG
        ops = result["ops"]
        print(f"\n[poison] EIO after {deaths} deaths in {took:.2f}s; {ops} other reader ops: no error")
        mgr.release_unused(set())
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mgr.close()


def test_failover_after_snapshotter_restart(root: Path) -> None:
    """A restarted snapshotter (new manager, same session holder) re-adopts the live daemon, has it
    send its session again, and a later kill -9 still fails over without reader errors."""
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    base = _config(root, img.blob_dir, "dedicated")
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    pm = fuse_pm()
    first = DaemonManager(config, pm)
    first.recover()
    inst = first.ensure_instance(_meta(root, "51", img), {})
    first.close()  # the snapshotter goes away; its supervisor with it, the daemon keeps serving
    mgr = DaemonManager(config, pm)
    load = None
    try:
        mgr.recover()
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None and fusedev(pm).session_holder is not None
        sup = fusedev(pm).session_holder.get(daemon.id)
        assert sup is not None and sup.has_state  # re-sent by the live daemon
        load = _start_load(inst.mountpoint, 2.0)
        time.sleep(0.3)
        old = daemon.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while fusedev(pm).alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mgr.check_liveness() == [daemon.id]
        d = mgr.daemon(inst.daemon_id)
        assert d is not None and d.pid != old
        result = _load_result(load)
        assert not result["errors"], result
        mgr.release_unused(set())
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mgr.close()


def test_crash_loop_limit_gives_failover_up(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The backend's crash-loop breaker: a daemon that keeps dying (killed -9 as soon as it serves)
    is failed over `max_deaths` times within the window, and the next death gives failover
    up: the daemon is forgotten as under ``none`` (records, holder session and mount gone; a
    reader still on the mount would now get ENOTCONN, a new Prepare starts a fresh daemon), with
    one clear log line, and nothing is respawned afterwards."""
    img = build_image(root / "build", {"big": BIG})
    base = _config(root, img.blob_dir, "dedicated")
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    pm = fuse_pm(crash_loop=CrashLoopBreaker(max_deaths=2, window=600.0, settle=600.0))
    mgr = DaemonManager(config, pm)
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "61", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None and fusedev(pm).session_holder is not None
        api_socket = daemon.api_socket
        pids = [daemon.pid]
        for _ in range(2):  # within the limit: failed over each time
            os.kill(pids[-1], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while fusedev(pm).alive(daemon) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert mgr.check_liveness() == [daemon.id]
            d = mgr.daemon(daemon.id)
            assert d is not None and d.pid not in pids and fusedev(pm).alive(d)
            pids.append(d.pid)
            daemon = d
        assert (inst.mountpoint / "big").read_bytes() == BIG
        os.kill(pids[-1], signal.SIGKILL)  # the third death within the window
        deadline = time.monotonic() + 10
        while fusedev(pm).alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.01)
        with caplog.at_level("ERROR", logger="nydus_fuse.backend.fusedev"):
            assert mgr.check_liveness() == [daemon.id]
        assert any("died 3 times within 600s (limit 2): crash loop, giving failover up" in r.getMessage()
                   for r in caplog.records), caplog.text  # fmt: skip
        assert mgr.daemon(daemon.id) is None and mgr.get_instance("61") is None
        assert mgr.store.get_daemon(daemon.id) is None and mgr.store.list_instances() == []
        assert not is_mounted(inst.mountpoint)
        assert daemon.id not in fusedev(pm).session_holder.status()
        # no respawn now or at the next sweeps
        assert mgr.check_liveness() == [] and mgr.check_liveness() == []
        alive = live_pids_mentioning(str(api_socket))
        assert alive == [], alive
        # a new container of the image gets a fresh daemon (and a fresh death count)
        again = mgr.ensure_instance(_meta_again(root, "61"), {})
        assert again.daemon_id != daemon.id and (again.mountpoint / "big").read_bytes() == BIG
        mgr.release_unused(set())
    finally:
        mgr.close()


def _meta_again(snapshotter_root: Path, meta_id: str) -> Any:
    """The meta snapshot of `meta_id` as it is still on disk (the snapshot outlives its daemon)."""
    from nydus_core import labels as L
    from nydus_core.control.snapshot.model import ImageSource

    boot = snapshotter_root / "snapshots" / meta_id / "fs" / "image" / "image.boot"
    ref = "localhost/test/img:latest"
    return ImageSource(format="nydus", meta_id=meta_id, bootstrap=boot, image_ref=ref,
                       labels={L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: ref})  # fmt: skip


def test_holder_killed_is_restarted_and_refilled(root: Path) -> None:
    """The session holder should never die; if it does while the daemon lives, the daemon still
    holds its session (nothing is lost), the next liveness sweep starts a new holder, the live
    daemon sends its session again, and a later kill -9 of the daemon is still failed over."""
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    base = _config(root, img.blob_dir, "dedicated")
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    pm = fuse_pm()
    mgr = DaemonManager(config, pm)
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "71", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        holder = fusedev(pm).session_holder
        assert daemon is not None and holder is not None
        first = holder.pid()
        assert first is not None and holder.holds(daemon.id)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(first) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (inst.mountpoint / "big").read_bytes() == BIG  # the daemon's own fd keeps the mount
        # the liveness monitor watches the holder's pidfd too: replaced long before the next sweep
        mgr.start_liveness_monitor(interval=3600.0)
        deadline = time.monotonic() + 30
        while not holder.holds(daemon.id) and time.monotonic() < deadline:
            time.sleep(0.05)
        mgr.stop_liveness_monitor()
        second = holder.pid()
        assert second is not None and second != first and holder.holds(daemon.id)
        load = _start_load(inst.mountpoint, 2.0)  # holds `big` open across the kill
        time.sleep(0.3)
        old = daemon.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while fusedev(pm).alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mgr.check_liveness() == [daemon.id]
        d = mgr.daemon(daemon.id)
        assert d is not None and d.pid != old
        result = _load_result(load)
        assert not result["errors"], result  # a takeover: a restart would break the held fd
        assert holder.pid() == second
        mgr.release_unused(set())
    finally:
        mgr.close()


def _daemons_left(where: Path) -> list[int]:
    """Live daemon processes (daemons and standbys: their API sockets are under ``socket/``)."""
    return live_pids_mentioning(str(where / "socket"))


def _standby_config(where: Path, blob_dir: Path) -> Any:
    base = _config(where, blob_dir, "dedicated")
    daemon = attrs.evolve(base.daemon, recover_policy="failover")
    return with_standby(attrs.evolve(base, daemon=daemon))


def _wait_failover(mgr: DaemonManager, pm: Any, daemon_id: str, old_pid: int) -> DaemonRecord:
    deadline = time.monotonic() + 20
    while True:
        d = mgr.daemon(daemon_id)
        if d is not None and d.pid != old_pid and fusedev(pm).alive(d):
            return d
        assert time.monotonic() < deadline, "no failover within 20 s"
        time.sleep(0.005)


def test_dead_standby_falls_back_to_a_cold_spawn(root: Path) -> None:
    """A standby that died before it was needed is not used: the failover spawns cold, readers
    see no error, and a new standby is started for the next death."""
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    pm = fuse_pm()
    mgr = DaemonManager(_standby_config(root, img.blob_dir), pm)
    load = None
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "61", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None
        first = _standby_in_init(daemon)
        os.kill(first.pid, signal.SIGKILL)
        mgr.start_liveness_monitor(interval=5.0)
        load = _start_load(inst.mountpoint, 2.0)
        time.sleep(0.3)
        old = daemon.pid
        os.kill(old, signal.SIGKILL)
        d = _wait_failover(mgr, pm, inst.daemon_id, old)
        assert d.pid != first.pid  # spawned after the death, not the dead standby
        log = (d.log_dir / "nydusd.log").read_text()
        assert d.api_socket != first.api_socket
        second = _standby_in_init(d)  # and the next death has a standby again
        assert second.pid not in (first.pid, d.pid)
        result = _load_result(load)
        assert not result["errors"], result
        assert "--upgrade" in log  # the standbys were started as takeover daemons
        mgr.release_unused(set())
        time.sleep(0.2)
        assert _daemons_left(root) == []
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mgr.close()


def test_standby_survives_a_snapshotter_restart(root: Path) -> None:
    """The standby is recorded on disk: a restarted snapshotter finds it, the next death is taken
    over by it, and releasing the image stops daemon and standbys (nothing left running)."""
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    config = _standby_config(root, img.blob_dir)
    pm = fuse_pm()
    first = DaemonManager(config, pm)
    first.recover()
    inst = first.ensure_instance(_meta(root, "71", img), {})
    d0 = first.daemon(inst.daemon_id)
    assert d0 is not None
    standby = _standby_in_init(d0)
    first.close()
    pm = fuse_pm()  # a new snapshotter process knows only nydus.db and files
    mgr = DaemonManager(config, pm)
    load = None
    try:
        mgr.recover()
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None and daemon.pid == d0.pid
        mgr.start_liveness_monitor(interval=5.0)
        load = _start_load(inst.mountpoint, 2.0)
        time.sleep(0.3)
        os.kill(daemon.pid, signal.SIGKILL)
        d = _wait_failover(mgr, pm, inst.daemon_id, d0.pid)
        assert (d.pid, d.api_socket) == (standby.pid, standby.api_socket)
        _standby_in_init(d)  # the recover hook knows the launch arguments again
        result = _load_result(load)
        assert not result["errors"], result
        mgr.release_unused(set())
        time.sleep(0.2)
        assert _daemons_left(root) == []
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mgr.close()


def test_standby_left_ready_is_started(root: Path) -> None:
    """A snapshotter killed after the standby's takeover and before its start leaves it READY:
    the next failover starts that very process (takeover answers 409, its state decides)."""
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    pm = fuse_pm()
    mgr = DaemonManager(_standby_config(root, img.blob_dir), pm)
    load = None
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "91", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None
        standby = _standby_in_init(daemon)
        mgr.start_liveness_monitor(interval=5.0)
        load = _start_load(inst.mountpoint, 2.0)
        time.sleep(0.3)
        with FuseSessionClient(standby.api_socket) as c:  # what the killed snapshotter had done
            c.takeover()  # (READY holds the fd but reads nothing: the daemon still serves alone)
            assert c.state() == "READY"
        old = daemon.pid
        os.kill(old, signal.SIGKILL)
        d = _wait_failover(mgr, pm, inst.daemon_id, old)
        assert (d.pid, d.api_socket) == (standby.pid, standby.api_socket)
        result = _load_result(load)
        assert not result["errors"], result
        mgr.release_unused(set())
        time.sleep(0.2)
        assert _daemons_left(root) == []
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        mgr.close()


def test_holder_and_daemon_both_dead_is_a_restart(root: Path) -> None:
    """What no design can save: when the session holder and the daemon are both gone, the last
    reference to the FUSE connection is closed and the kernel aborts it. A file opened before
    then fails with ENOTCONN; the manager notices that the holder has no session, restarts the
    daemon as under ``restart`` (stale mount cleared, fresh mount), and new opens work."""
    img = build_image(root / "build", {"big": BIG})
    base = _config(root, img.blob_dir, "dedicated")
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    pm = fuse_pm()
    mgr = DaemonManager(config, pm)
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "81", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        holder = fusedev(pm).session_holder
        assert daemon is not None and holder is not None
        holder_pid, old = holder.pid(), daemon.pid
        assert holder_pid is not None
        fd = os.open(inst.mountpoint / "big", os.O_RDONLY)
        try:
            os.kill(holder_pid, signal.SIGKILL)
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while (process_alive(holder_pid) or process_alive(old)) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            with pytest.raises(OSError) as err:
                os.pread(fd, 4096, 0)
            assert err.value.errno == errno.ENOTCONN  # what a running container sees
            assert mgr.check_liveness() == [daemon.id]
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        d = mgr.daemon(daemon.id)
        assert d is not None and d.pid != old
        assert (inst.mountpoint / "big").read_bytes() == BIG  # new containers are served
        assert holder.pid() not in (None, holder_pid) and holder.holds(daemon.id)  # failover again
        mgr.release_unused(set())
    finally:
        mgr.close()


def test_shared_standby_preloads_images_and_matches_the_state_at_takeover(root: Path) -> None:
    """A shared daemon's standby opens the images of the supervisor's state before any death (so
    the takeover does not); images attached or detached after that are matched at the takeover:
    the new one is served with its inode numbers, the detached one is gone."""
    img = build_image(root / "build", {"big": BIG, "a.txt": b"A\n"})
    img2 = build_image(root / "build2", {"b.txt": b"B\n" * 1000}, name="two")
    img3 = build_image(root / "build3", {"c.txt": b"C\n"}, name="three")
    for extra in (img2, img3):
        for blob in extra.blob_dir.iterdir():
            shutil.copyfile(blob, img.blob_dir / blob.name)
    base = _config(root, img.blob_dir, "shared")
    daemon_cfg = attrs.evolve(base.daemon, recover_policy="failover")
    pm = fuse_pm()
    mgr = DaemonManager(with_standby(attrs.evolve(base, daemon=daemon_cfg)), pm)
    try:
        mgr.recover()
        a = mgr.ensure_instance(_meta(root, "81", img), {})
        c = mgr.ensure_instance(_meta(root, "83", img3), {})
        daemon = mgr.daemon(a.daemon_id)
        assert daemon is not None
        warm = _standby_in_init(daemon)  # it preloaded 81 and 83
        b = mgr.ensure_instance(_meta(root, "82", img2), {})  # attached after the preload
        ino_b = os.stat(b.mountpoint / "b.txt").st_ino
        mgr.release_unused({"81", "82"})  # 83 detached after the preload
        assert not (daemon.mountpoint / "83").exists()
        mgr.start_liveness_monitor(interval=5.0)
        old = daemon.pid
        os.kill(old, signal.SIGKILL)
        d = _wait_failover(mgr, pm, a.daemon_id, old)
        assert d.pid == warm.pid  # the standby took over
        log = (d.log_dir / "nydusd.log").read_text()
        assert "cannot preload" not in log, log
        # detached by the old daemon, then preloaded by the standby and closed at its takeover
        assert log.count("umounted /83") == 2, log
        assert (a.mountpoint / "big").read_bytes() == BIG
        assert (b.mountpoint / "b.txt").read_bytes() == b"B\n" * 1000
        assert os.stat(b.mountpoint / "b.txt").st_ino == ino_b  # same inode numbers as before
        assert sorted(os.listdir(d.mountpoint)) == ["81", "82"]
        assert not (c.mountpoint / "c.txt").exists()
        mgr.release_unused(set())
        (shared,) = mgr.daemons()
        fusedev(pm).stop(shared)
    finally:
        mgr.close()
