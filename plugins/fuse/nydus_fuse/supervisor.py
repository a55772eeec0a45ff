"""The supervisor protocol: how a FUSE daemon's session (its ``/dev/fuse`` fd and state) outlives it.

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

The supervisor side is the session holder (`nydus_fuse.holder`), a process of its own that
outlives the snapshotter. This module has the daemon side (`send_state`, `peek_state`,
`fetch_state`) and the framing the holder's client reuses.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

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
