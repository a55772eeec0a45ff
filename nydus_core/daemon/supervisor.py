"""The supervisor: keeps a FUSE daemon's session (its ``/dev/fuse`` fd and state) across daemon deaths.

A FUSE mount lives as long as one open reference to its ``/dev/fuse`` file exists. If only the
daemon holds it, a crash aborts the connection and every container reading through the mount
sees ENOTCONN. The supervisor is that second holder: the daemon pushes its state (JSON: mounts,
bootstrap/config paths, the saved FUSE INIT request) plus a dup of the fd over a unix socket
(``SCM_RIGHTS``), and a replacement daemon fetches both back and serves the same kernel session.

Wire protocol, one ``SOCK_SEQPACKET`` message each way (message boundaries keep fd and JSON
together): the client sends ``{"op": "save", "state": {...}}`` with exactly one fd, or
``{"op": "fetch"}``; the supervisor answers ``{"ok": true}`` / ``{"ok": true, "state": {...}}`` with
the fd, or ``{"ok": false, "error": "..."}``. ``{"op": "peek"}`` (our extension) answers the state
without the fd. Sockets are created 0600.

The snapshotter does not run these in-process supervisors: its daemon manager uses the session
holder (`nydus_core.daemon.holder`), a process of its own that serves the same protocol and
outlives the snapshotter. `Supervisor` stays for tests and tools that want a supervisor in their
own process, and this module keeps the daemon-side functions (`send_state`, `fetch_state`) and
the framing the holder's client reuses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
IO_TIMEOUT = 5.0


class SupervisorError(Exception):
    """The supervisor could not be reached or has nothing to hand over."""


def _send(sock: socket.socket, doc: dict[str, Any], fds: list[int]) -> None:
    data = json.dumps(doc).encode()
    if len(data) > MAX_MESSAGE:
        raise SupervisorError(f"state of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    socket.send_fds(sock, [data], fds)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    try:
        doc = json.loads(data or b"null")
    except ValueError as e:
        for fd in fds:
            os.close(fd)
        raise SupervisorError(f"malformed supervisor message: {e}") from e
    if not isinstance(doc, dict):
        for fd in fds:
            os.close(fd)
        raise SupervisorError("supervisor message is not a JSON object")
    return doc, fds


class Supervisor:
    """One daemon's supervisor socket at `path`; holds the latest state and fd it was given."""

    def __init__(self, path: Path | str, daemon_id: str = "") -> None:
        self.path = Path(path)
        self.daemon_id = daemon_id
        self._lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._fd = -1
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"supervisor-{daemon_id}", daemon=True)
        self._thread.start()

    # -- what it holds ---------------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        with self._lock:
            return self._fd >= 0

    def state(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._state) if self._state is not None else None

    def save(self, state: dict[str, Any], fd: int) -> None:
        """Keep `state` and a dup of `fd` (replacing and closing what was kept before)."""
        new = os.dup(fd)
        with self._lock:
            old, self._fd, self._state = self._fd, new, state
        if old >= 0:
            os.close(old)

    def dup_fd(self) -> int:
        with self._lock:
            if self._fd < 0:
                raise SupervisorError(f"supervisor {self.path} holds no FUSE session")
            return os.dup(self._fd)

    # -- socket ----------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(IO_TIMEOUT)
                try:
                    self._handle(conn)
                except (OSError, SupervisorError) as e:
                    log.warning("supervisor %s: %s", self.path, e)

    def _handle(self, conn: socket.socket) -> None:
        doc, fds = _recv(conn)
        op = doc.get("op")
        try:
            if op == "save":
                state = doc.get("state")
                if len(fds) != 1 or not isinstance(state, dict):
                    _send(conn, {"ok": False, "error": "save needs a state object and exactly one fd"}, [])
                    return
                self.save(state, fds[0])
                log.info("supervisor %s: saved state and FUSE fd", self.daemon_id or self.path)
                _send(conn, {"ok": True}, [])
            elif op == "fetch":
                with self._lock:
                    st, fd = self._state, self._fd
                    if fd >= 0:
                        _send(conn, {"ok": True, "state": st}, [fd])
                if fd < 0:
                    _send(conn, {"ok": False, "error": "no state saved"}, [])
                else:
                    log.info("supervisor %s: handed the FUSE session over", self.daemon_id or self.path)
            elif op == "peek":
                st = self.state()
                _send(conn, {"ok": True, "state": st} if st is not None else
                      {"ok": False, "error": "no state saved"}, [])  # fmt: skip
            else:
                _send(conn, {"ok": False, "error": f"unknown op {op!r}"}, [])
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        """Stop listening and drop the fd (the mount dies with it unless someone else holds one)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=2)
        self.path.unlink(missing_ok=True)
        with self._lock:
            fd, self._fd, self._state = self._fd, -1, None
        if fd >= 0:
            os.close(fd)


def _connect(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise SupervisorError(f"cannot reach supervisor {path}: {e}") from e
    return sock


def send_state(path: Path | str, state: dict[str, Any], fd: int) -> None:
    """Daemon side of ``sendfd``: push `state` and `fd` to the supervisor at `path`."""
    with _connect(path) as sock:
        _send(sock, {"op": "save", "state": state}, [fd])
        reply, fds = _recv(sock)
    for extra in fds:
        os.close(extra)
    if not reply.get("ok"):
        raise SupervisorError(f"supervisor {path} refused the state: {reply.get('error')}")


def peek_state(path: Path | str) -> dict[str, Any]:
    """The saved state without the fd (``{"op": "peek"}``, our extension): a warm standby opens
    the images it names ahead of the takeover. Raises `SupervisorError` when there is none."""
    with _connect(path) as sock:
        _send(sock, {"op": "peek"}, [])
        reply, fds = _recv(sock)
    for fd in fds:
        os.close(fd)
    if not reply.get("ok") or not isinstance(reply.get("state"), dict):
        raise SupervisorError(f"supervisor {path} has no state to show: {reply.get('error')}")
    state: dict[str, Any] = reply["state"]
    return state


def fetch_state(path: Path | str) -> tuple[dict[str, Any], int]:
    """Daemon side of ``takeover``: the saved state and a fresh fd of the FUSE session."""
    with _connect(path) as sock:
        _send(sock, {"op": "fetch"}, [])
        reply, fds = _recv(sock)
    if not reply.get("ok") or len(fds) != 1 or not isinstance(reply.get("state"), dict):
        for fd in fds:
            os.close(fd)
        raise SupervisorError(f"supervisor {path} has no session to hand over: {reply.get('error')}")
    return reply["state"], fds[0]


class Supervisors:
    """The snapshotter's supervisors, one per failover daemon, under ``<root>/supervisor/``."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "supervisor"
        self._lock = threading.Lock()
        self._by_id: dict[str, Supervisor] = {}

    def path_of(self, daemon_id: str) -> Path:
        return self.dir / f"{daemon_id}.sock"

    def ensure(self, daemon_id: str) -> Supervisor:
        with self._lock:
            sup = self._by_id.get(daemon_id)
            if sup is None:
                sup = self._by_id[daemon_id] = Supervisor(self.path_of(daemon_id), daemon_id)
            return sup

    def get(self, daemon_id: str) -> Supervisor | None:
        with self._lock:
            return self._by_id.get(daemon_id)

    def remove(self, daemon_id: str) -> None:
        """Close the daemon's supervisor and delete what its daemons kept beside the socket
        (the in-flight journal and poison counts of ``nydusd-py``)."""
        with self._lock:
            sup = self._by_id.pop(daemon_id, None)
        if sup is not None:
            sup.close()
        for suffix in (".inflight", ".poison.json"):
            (self.dir / f"{daemon_id}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            sups = list(self._by_id.values())
            self._by_id.clear()
        for sup in sups:
            sup.close()
