"""``[daemon] spare_daemon``: a pre-started ``nydusd-py spare`` becomes the next daemon.

Real processes: ``containerd-nydus-grpc`` driven over gRPC, the spare, the daemon it becomes
serving a real FUSE mount. The spare is niced; once handed a command line it is that daemon in
every way the snapshotter can see (its ``/proc`` command line names the daemon's API socket, its
priority is the snapshotter's, its log is the daemon's), a new spare takes its place, and a
spare never outlives its snapshotter.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fuse_helpers import nydusd_py
from nydus_fuse.backend.spare import TITLE_ROOM
from test_snapshotter_crash_failover import FILES, Stack, spare_pids

from nydus_core.control.daemons import process
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.images import Image, build_image
from nydus_core.testing.services import live_pids_mentioning, process_alive, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")


def _cmdline(pid: int) -> list[bytes]:
    return [a for a in process.cmdline(pid) if a]  # the spare pads with NULs


def test_prepare_takes_the_spare_and_a_new_one_waits(root: Path, image: Image) -> None:
    stack = Stack(root, image)
    stack.config.write_text(stack.config.read_text() + "spare_daemon = true\n")  # [daemon] is last
    snap = stack.snapshotter()
    snap.start()
    try:
        spare_sock = stack.root / "spare" / "api.sock"
        wait_until(lambda: len(spare_pids(stack.root)) == 1 and spare_sock.exists(), 30, "a spare daemon")
        (spare,) = spare_pids(stack.root)
        assert os.getpriority(os.PRIO_PROCESS, spare) == 19
        assert (spare_sock.stat().st_mode & 0o777) == 0o600
        mnt = stack.pull_and_prepare()
        (daemon,) = snap.system_get("/api/v1/daemons")
        assert daemon["pid"] == spare  # the spare became the daemon
        args = _cmdline(spare)
        assert os.fsencode(daemon["api_socket"]) in args and b"spare" not in args
        assert args[1:3] == [os.fsencode(str(nydusd_py())), b"fuse"]
        assert os.getpriority(os.PRIO_PROCESS, spare) == os.getpriority(os.PRIO_PROCESS, snap.pid or 0)
        assert (mnt / "d" / "f7").read_bytes() == b"7" * 7 and (mnt / "big").read_bytes() == FILES["big"]
        # logs go where a cold daemon's go (here --log-to-stdout: the snapshotter's output)
        logged = snap.log_path.read_text()
        assert "spare: becoming" in logged and f"RUNNING at {daemon['mountpoint']}" in logged
        # a new spare replaces the one taken
        wait_until(lambda: [p for p in spare_pids(stack.root) if p != spare] != [], 30, "a new spare")
        stack.release()
    finally:
        snap.kill9()
    # killed -9, the snapshotter leaves no spare behind (the spare watches its parent)
    wait_until(lambda: spare_pids(stack.root) == [], 10, "the spare to leave with its snapshotter")


def test_snapshotter_killed_9_restarts_serving_with_a_new_spare(root: Path, image: Image) -> None:
    """Restarted after a kill -9, the snapshotter serves gRPC, the old spare is gone (it could not
    leave by itself: stopped, like one niced on a busy machine that has not looked yet) and a new
    spare listens on ``spare/api.sock``. Starting the spare does not hold up serving: the old one
    is killed and the new one started in the background."""
    stack = Stack(root, image)
    stack.config.write_text(stack.config.read_text() + "spare_daemon = true\n")  # [daemon] is last
    spare_sock = stack.root / "spare" / "api.sock"
    snap = stack.snapshotter()
    snap.start()
    try:
        wait_until(lambda: process.serving_pid(spare_sock) is not None, 30, "the first spare")
        (old,) = spare_pids(stack.root)
        os.kill(old, signal.SIGSTOP)
        snap.kill9()
        snap.restart()
        with SnapshotterClient(stack.address) as c:
            assert c.list() == []  # served
        wait_until(lambda: not process_alive(old), 10, f"the old spare (pid {old}) to be killed")
        wait_until(lambda: process.serving_pid(spare_sock) not in (None, old), 30, "a new spare")
        assert spare_pids(stack.root) == [process.serving_pid(spare_sock)]
        logged = snap.log_path.read_text().rsplit("=== ", 1)[1]  # the restarted snapshotter's
        assert f"killing the spare daemon of an earlier snapshotter (pid {old})" in logged
        assert "started spare daemon" in logged
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)
        snap.kill9()


def test_a_spare_leaving_late_does_not_remove_the_next_ones_socket(root: Path) -> None:
    """A spare that notices late that its snapshotter is gone, after the next snapshotter's spare
    bound the same path, leaves that socket alone (it removes only the socket it bound)."""
    sock = root / "spare.sock"
    spare_argv = [str(nydusd_py()), "spare", "--apisock", str(sock), "--title-room", "_" * 600]
    # the first spare's "snapshotter": a parent that starts it and can be killed
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "print(subprocess.Popen(sys.argv[1:]).pid, flush=True); time.sleep(600)",
                               *spare_argv], stdout=subprocess.PIPE)  # fmt: skip
    assert parent.stdout is not None
    first = int(parent.stdout.readline())
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: process.serving_pid(sock) == first, 30, "the first spare to listen")
        os.kill(first, signal.SIGSTOP)  # it has not looked at its parent yet
        second = subprocess.Popen(spare_argv)  # the next snapshotter's: replaces the socket file
        wait_until(lambda: process.serving_pid(sock) == second.pid, 30, "the second spare to listen")
        parent.kill()
        parent.wait()
        os.kill(first, signal.SIGCONT)
        wait_until(lambda: not process_alive(first), 10, "the first spare to leave")
        assert process.serving_pid(sock) == second.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGKILL)
        for proc in (parent, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return build_image(tmp_path / "img", FILES)


def _spare(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "spare.sock"
    proc = subprocess.Popen([str(nydusd_py()), "spare", "--apisock", str(sock), "--title-room", "_" * 600,
                             "--log-file", str(tmp / "spare.log")])  # fmt: skip
    wait_until(sock.exists, 30, "the spare to listen")
    return proc, sock


def _ask(sock: Path, doc: object) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(json.dumps(doc).encode() + b"\n")
        return s.makefile("rb").readline().decode().strip()


def test_spare_refuses_what_it_cannot_become_and_stays_a_spare(root: Path) -> None:
    tmp = root
    proc, sock = _spare(tmp)
    try:
        program = str(nydusd_py())
        long_path = "/x" * 400  # 800 bytes: more than the 600 reserved
        assert _ask(sock, {"argv": [program, "fuse", "--apisock", long_path]}).startswith("no: ")
        assert _ask(sock, {"argv": ["/bin/true", "fuse"]}).startswith("no: ")
        assert _ask(sock, {"argv": "fuse"}).startswith("no: ")
        assert _ask(sock, {"argv": [program, "fuse"], "priority": "high"}).startswith("no: ")
        assert proc.poll() is None and b"spare" in b"\0".join(_cmdline(proc.pid))
        # a command line that fits: it becomes that daemon (here one argparse refuses: exit 2)
        assert _ask(sock, {"argv": [program, "fuse", "--apisock", str(tmp / "d.sock")]}) == "ok"
        assert proc.wait(timeout=30) == 2
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert live_pids_mentioning(str(tmp)) == []


def test_title_room_fits_a_long_daemon_command_line() -> None:
    """The room reserved is several times a daemon's command line with long paths."""
    path = "/var/lib/containerd-nydus/" + "x" * 60
    argv = [str(nydusd_py()), "fuse", "--thread-num", "4", "--config", f"{path}/config.json", "--bootstrap",
            f"{path}/image.boot", "--mountpoint", f"{path}/mnt", "--apisock", f"{path}/api.sock",
            "--log-level", "info", "--log-file", f"{path}/nydusd.log", "--supervisor", f"{path}/sup.sock",
            "--id", "x" * 20, "--failover-policy", "resend"]  # fmt: skip
    assert 3 * len("\0".join(argv)) < TITLE_ROOM
