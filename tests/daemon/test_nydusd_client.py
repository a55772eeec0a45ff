"""The nydusd API client against a real (mini) nydusd process on a unix socket."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import pid_alive

from nydus_core.control.daemons.client import NydusdApiError, NydusdClient, NydusdUnreachable
from nydus_core.control.daemons.mounts import is_mounted

MINI = Path(__file__).with_name("mini_nydusd.py")


@pytest.fixture
def shared_daemon(root: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = root / "api.sock"
    proc = subprocess.Popen(
        [sys.executable, str(MINI), "fuse", "--mountpoint", str(root / "mnt"), "--apisock", str(sock),
         "--log-file", str(root / "mini.log")],
    )  # fmt: skip
    yield proc, sock
    proc.terminate()
    proc.wait(10)


def test_daemon_info_and_wait_state(shared_daemon: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, sock = shared_daemon
    with NydusdClient(sock) as c:
        assert c.wait_state("RUNNING", timeout=10)
        info = c.daemon_info()
        assert info.state == "RUNNING" and info.version["package_ver"] == "mini-0.1.0"
        assert c.blobcache_metrics()["underlying_files"] == []
        assert c.inflight_metrics() is None  # 204: nothing in flight
        assert not c.wait_state("READY", timeout=0.2)
    assert sock.stat().st_mode & 0o777 == 0o600


def test_mount_umount_and_errors(root: Path, shared_daemon: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, sock = shared_daemon
    boot = root / "image.boot"
    boot.write_text(json.dumps({"files": {"f": "x"}}))
    with NydusdClient(sock) as c:
        assert c.wait_state("RUNNING", timeout=10)
        c.mount("5", boot, json.dumps({"device": {}}))
        assert is_mounted(root / "mnt" / "5") and (root / "mnt" / "5" / "f").read_text() == "x"
        with pytest.raises(NydusdApiError) as exc:
            c.mount("5", boot, "{}")
        assert (exc.value.status, exc.value.code) == (409, "EEXIST")
        assert "already mounted" in exc.value.message
        with pytest.raises(NydusdApiError, match="not JSON"):
            c.mount("6", boot, "{not json")
        c.umount("5")
        assert not is_mounted(root / "mnt" / "5")
        with pytest.raises(NydusdApiError) as exc:
            c.umount("5")
        assert (exc.value.status, exc.value.code) == (404, "ENOENT")


def test_unreachable_daemon(root: Path, shared_daemon: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = shared_daemon
    with NydusdClient(root / "nothing.sock") as c:
        with pytest.raises(NydusdUnreachable, match="does not exist"):
            c.state()
        assert not c.wait_state("RUNNING", timeout=0.2)
    with NydusdClient(sock) as c:
        assert c.wait_state("RUNNING", timeout=10)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 5
        while pid_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(NydusdUnreachable):  # the socket file is left behind, nobody listens
            c.state()
