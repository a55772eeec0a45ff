"""`recover_policy` end to end through the `DaemonManager` and the default fusedev hooks (root).

``failover``: the manager runs a supervisor per daemon, the liveness monitor notices a kill -9
(pidfd) and the builtin recover hook spawns a replacement that takes the live FUSE session over:
readers that keep files open and readers that open new ones see no error and right bytes.

``restart``: what running containers see is documented by assertion: a file opened before the
kill fails with ENOTCONN (the old FUSE connection is gone with its mount), while opens after the
respawn work again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import attrs
import pytest
from nydusd_helpers import build_image
from test_nydusd_py_manager import _config, _meta, root  # noqa: F401  (fixture)

from nydus_core.daemon.manager import DaemonManager
from nydus_core.daemon.mounts import is_mounted
from nydus_core.plugins import build_plugin_manager

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")

BIG = os.urandom((2 << 20) + 777)
KILLS = 5


def _readers(
    mnt: Path, stop: threading.Event, errors: list[str], pauses: list[float]
) -> list[threading.Thread]:
    want = hashlib.sha256(BIG).hexdigest()

    def held() -> None:  # a file kept open across every kill, read again and again
        fd = os.open(mnt / "big", os.O_RDONLY)
        try:
            while not stop.is_set():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t = time.monotonic()
                data = os.pread(fd, len(BIG) + 1, 0)
                pauses.append(time.monotonic() - t)
                if hashlib.sha256(data).hexdigest() != want:
                    errors.append("held fd read wrong bytes")
        finally:
            os.close(fd)

    def fresh() -> None:  # new opens and listings
        while not stop.is_set():
            t = time.monotonic()
            names = sorted(os.listdir(mnt / "d"))
            data = (mnt / "d" / "f7").read_bytes()
            pauses.append(time.monotonic() - t)
            if names != [f"f{i}" for i in sorted(range(10), key=str)] or data != b"7" * 7:
                errors.append(f"listing/reading d went wrong: {names} {data!r}")

    def guard(fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    return [threading.Thread(target=guard, args=(f,), daemon=True) for f in (held, fresh)]


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_failover_policy_keeps_readers_going(mode: str, root: Path) -> None:  # noqa: F811
    img = build_image(root / "build", {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}})
    base = _config(root, img.blob_dir, mode)
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    pm = build_plugin_manager([], entry_points=False, env={})
    mgr = DaemonManager(config, pm)
    stop = threading.Event()
    errors: list[str] = []
    pauses: list[float] = []
    threads = []
    try:
        mgr.recover()
        inst = mgr.ensure_instance(_meta(root, "21", img), {})
        daemon = mgr.daemon(inst.daemon_id)
        assert daemon is not None and daemon.supervisor_path is not None
        assert mgr.supervisors is not None
        sup = mgr.supervisors.get(daemon.id)
        assert sup is not None and sup.has_state
        mgr.start_liveness_monitor(interval=5.0)
        threads = _readers(inst.mountpoint, stop, errors, pauses)
        for th in threads:
            th.start()
        time.sleep(0.3)
        took = []
        for _ in range(KILLS):
            old = daemon.pid
            t = time.monotonic()
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                d = mgr.daemon(inst.daemon_id)
                if d is not None and d.pid != old and pm.hook.nydus_daemon_alive(daemon=d):
                    break
                assert time.monotonic() < deadline, "no failover within 20 s"
                time.sleep(0.005)
            took.append(time.monotonic() - t)
            daemon = d
            time.sleep(0.3)
            assert not errors, errors
        stop.set()
        for th in threads:
            th.join(timeout=30)
        assert not errors, errors
        assert mgr.get_instance("21") is not None
        print(
            f"\n[manager failover {mode}] {KILLS} kill -9: kill->RUNNING max {max(took) * 1000:.0f} ms, "
            f"longest reader op {max(pauses) * 1000:.0f} ms, {len(pauses)} reader ops, no error"
        )
        mgr.release_unused(set())
        assert not is_mounted(inst.mountpoint)
        if mode == "shared":
            (shared,) = mgr.daemons()
            pm.hook.nydus_daemon_stop(daemon=shared)
    finally:
        stop.set()
        mgr.close()


def test_restart_policy_breaks_open_files_but_serves_new_opens(root: Path) -> None:  # noqa: F811
    img = build_image(root / "build", {"big": BIG})
    config = _config(root, img.blob_dir, "dedicated")
    assert config.daemon.recover_policy == "restart"
    pm = build_plugin_manager([], entry_points=False, env={})
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
            while pm.hook.nydus_daemon_alive(daemon=daemon) and time.monotonic() < deadline:
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
