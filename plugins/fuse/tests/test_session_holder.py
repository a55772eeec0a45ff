"""The session holder process (`nydus_fuse.holder`) and its client, as real processes.

The FUSE-level proof (a daemon killed -9 while the snapshotter is dead is still failed over,
with the same holder) is in ``tests/fuse/test_snapshotter_crash_failover.py``; here: what the
holder promises on its own -- stdlib only, private sockets, the supervisor wire protocol with a
real fd passed both ways, one holder per root, no stall behind a client that says nothing, and
it refuses to shut down while it holds a session.
"""

from __future__ import annotations

import ast
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nydus_fuse import holder as holder_module
from nydus_fuse.backend.holder_client import HolderError, SessionHolder
from nydus_fuse.supervisor import SupervisorError, fetch_state, peek_state, send_state

from nydus_core.testing.services import process_alive, wait_until


@pytest.fixture
def holder(root: Path) -> Iterator[SessionHolder]:
    h = SessionHolder(root, log_file=root / "logs" / "holder.log")
    h.ensure_running()
    yield h
    h.shutdown(force=True)  # the root fixture kills it anyway (its command line names the root)


def test_holder_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(holder_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the holder"
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_holder_keeps_a_session_and_hands_it_over(holder: SessionHolder) -> None:
    assert stat.S_IMODE(holder.control.stat().st_mode) == 0o600
    entry = holder.ensure("d1")
    assert entry.path == holder.path_of("d1")
    assert stat.S_IMODE(entry.path.stat().st_mode) == 0o600
    assert holder.get("d1") is not None and not entry.has_state
    assert holder.get("other") is None
    with pytest.raises(SupervisorError, match="no state"):
        peek_state(entry.path)
    # a daemon saves its state and fd (a pipe stands in for /dev/fuse), then exits
    r, w = os.pipe()
    send_state(entry.path, {"mountpoint": "/m", "fuse_init": "00"}, w)
    os.close(w)
    assert entry.has_state
    assert holder.status()["d1"]["mountpoint"] == "/m"
    assert peek_state(entry.path) == {"mountpoint": "/m", "fuse_init": "00"}  # a standby's look, no fd
    # a replacement fetches the same file back: what it writes comes out of our read end
    state, fd = fetch_state(entry.path)
    assert state == {"mountpoint": "/m", "fuse_init": "00"}
    os.write(fd, b"same session")
    os.close(fd)
    assert os.read(r, 64) == b"same session"
    # while it holds a session it refuses to exit, unless forced
    with pytest.raises(HolderError, match="still holding the sessions of d1"):
        holder.request({"op": "shutdown"})
    holder.remove("d1")
    assert not entry.path.exists() and holder.status() == {}
    # the holder's copy is closed: the pipe has no writer left
    assert os.read(r, 64) == b""
    os.close(r)


def test_bad_requests_are_answered_and_the_holder_lives_on(holder: SessionHolder) -> None:
    with pytest.raises(HolderError, match="bad daemon id"):
        holder.request({"op": "ensure", "id": "../escape"})
    with pytest.raises(HolderError, match="unknown op"):
        holder.request({"op": "explode"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(str(holder.control))
        s.send(b"not json")
        assert b"not a JSON object" in s.recv(4096)
    # a client that connects and says nothing does not stall the others (one select loop)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(str(holder.control))
    try:
        assert holder.request({"op": "ping"}, timeout=holder_module.IO_TIMEOUT / 2)["pid"] == holder.pid()
    finally:
        silent.close()


def test_one_holder_per_root(root: Path, holder: SessionHolder) -> None:
    pid = holder.pid()
    argv = [sys.executable, "-I", holder_module.__file__, "--root", str(root)]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 3, second.stderr
    assert "another holder serves" in second.stderr
    # a new client (a restarted snapshotter) finds and reuses the running one
    assert SessionHolder(root).ensure_running() == pid


def test_backend_purge(root: Path) -> None:
    """The fusedev backend's purge ends the root's session holder (it outlives snapshotters on
    purpose; only a teardown of the whole root stops it), without an opened backend."""
    from nydus_fuse.backend.fusedev import FusedevBackend

    holder = SessionHolder(root)
    pid = holder.ensure_running()
    assert holder.pid() == pid
    FusedevBackend().purge(root)
    wait_until(lambda: not process_alive(pid), 10, "the session holder to end after the purge")
    assert SessionHolder(root).pid() is None
    FusedevBackend().purge(root)  # nothing left to stop: not an error
