"""The session holder: a tiny long-lived process that keeps FUSE sessions alive across snapshotter crashes.

A FUSE mount lives as long as one open reference to its ``/dev/fuse`` file exists. Under
``recover_policy = "failover"`` the daemon is not the only holder: it hands a dup of its fd (and
its state: mounts, paths, the saved FUSE INIT) to a supervisor socket, so that a replacement can
take the session over when it dies. If that supervisor lived in the snapshotter, a snapshotter
that dies while a daemon is dead (mid-failover) would drop the last reference and every reader
of the mount would get ENOTCONN. So the sessions live here, in a process of its own:

* one holder per snapshotter root, started by the daemon manager (in its own session, so a
  signal to the snapshotter's process group spares it) and found again by its control socket;
* **standard library only**, run as a script (``python -I holder.py``, not ``-m``, so that not
  even the ``nydus_core`` package is imported): small enough to be hard to crash;
* single-threaded: one ``selectors`` loop over every listening socket and every connection;
  a connection gets `IO_TIMEOUT` seconds to send its one message, so a stuck client cannot stall
  the hand-over of another daemon's session.

Per daemon ``<root>/supervisor/<id>.sock`` (0600) speaks the supervisor wire protocol that
``nydusd-py`` and a real ``nydusd`` already use (see ``nydus_fuse.supervisor``): one
``SOCK_SEQPACKET`` message each way, ``{"op": "save", "state": {...}}`` + one fd, or
``{"op": "fetch"}`` answered with the state and the fd (``{"op": "peek"}``: the state alone).

The control socket ``<root>/supervisor/holder.ctl`` (0600, same framing, no fds) serves the
manager: ``ping``, ``ensure`` (id → socket path), ``remove`` (close the socket and drop the fd),
``status`` (which ids are served and which hold a session) and ``shutdown`` (refused while a
session is held, unless ``force``).

**It never exits by itself.** An exit when idle was considered and rejected: every self-exit is
a decision that can race with the manager's next ``ensure``, and a crash or wrong exit of the
holder is exactly the failure it exists to prevent; an idle holder costs one sleeping process.
It stops on ``shutdown`` (the manager sends it when the policy is no longer ``failover`` and
nothing is held) or on a signal. One holder per root is guaranteed by an ``flock`` on
``holder.lock``, held for the process's lifetime.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import time
from typing import Any

log = logging.getLogger("nydus-session-holder")

CONTROL_NAME = "holder.ctl"
LOCK_NAME = "holder.lock"
MAX_MESSAGE = 1 << 16
IO_TIMEOUT = 5.0
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def listen_private(path: str, kind: int = socket.SOCK_STREAM, backlog: int = 16) -> socket.socket:
    """A unix listener at `path` (a stale socket there is replaced), 0600 from the first moment: the
    umask is narrowed around ``bind``, so no other user can connect in between. Also the
    spare daemon's (this module stays standard-library only, so anything may import it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def _listen(path: str) -> socket.socket:
    """A non-blocking SEQPACKET listener at `path`, 0600 from the first moment."""
    sock = listen_private(path, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    return sock


class Session:
    """One daemon's supervisor socket and what it was given: the latest state and fd."""

    def __init__(self, daemon_id: str, path: str) -> None:
        self.id = daemon_id
        self.path = path
        self.listener = _listen(path)
        self.fd = -1
        self.state: dict[str, Any] | None = None
        self.saves = 0
        self.fetches = 0
        self.saved_at = 0.0

    def info(self) -> dict[str, Any]:
        st = self.state or {}
        return {
            "path": self.path,
            "has_session": self.fd >= 0,
            "saves": self.saves,
            "fetches": self.fetches,
            "saved_at": self.saved_at,
            "mountpoint": st.get("mountpoint", ""),
            "version": st.get("version", ""),
        }

    def save(self, state: dict[str, Any], fd: int) -> None:
        old, self.fd, self.state = self.fd, fd, state
        self.saves += 1
        self.saved_at = time.time()
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Holder:
    """The process's whole state: the sessions by daemon id, and the selector loop serving them."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.sessions: dict[str, Session] = {}
        self.sel = selectors.DefaultSelector()
        self.control = _listen(os.path.join(directory, CONTROL_NAME))
        self.sel.register(self.control, selectors.EVENT_READ, ("accept", None))
        self.pending: dict[socket.socket, tuple[float, Session | None]] = {}
        self.stopping = False

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(timeout=1.0):
                kind, session = key.data
                try:
                    if kind == "accept":
                        self._accept(key.fileobj, session)  # type: ignore[arg-type]
                    else:
                        self._serve(key.fileobj, session)  # type: ignore[arg-type]
                except Exception:  # one bad client must never take the sessions down
                    log.exception("error serving %s", session.id if session else "control")
            now = time.monotonic()
            for conn, (since, _s) in list(self.pending.items()):
                if now - since > IO_TIMEOUT:
                    self._drop(conn)
        self.control.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, CONTROL_NAME))

    def _accept(self, listener: socket.socket, session: Session | None) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.pending[conn] = (time.monotonic(), session)
        self.sel.register(conn, selectors.EVENT_READ, ("conn", session))

    def _drop(self, conn: socket.socket) -> None:
        self.pending.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        conn.close()

    def _serve(self, conn: socket.socket, session: Session | None) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        try:
            try:
                doc = json.loads(data or b"null")
            except ValueError:
                doc = None
            out: list[int] = []
            if not isinstance(doc, dict):
                reply = {"ok": False, "error": "message is not a JSON object"}
            elif session is None:
                reply = self._control(doc)
            else:
                reply, out, fds = self._supervise(session, doc, fds)
            conn.settimeout(1.0)
            try:
                socket.send_fds(conn, [_encode(reply)], out)
            except OSError as e:
                log.warning("cannot answer a client: %s", e)
        finally:
            for fd in fds:
                os.close(fd)
            self._drop(conn)

    # -- the supervisor protocol of one daemon ----------------------------------------------
    def _supervise(
        self, s: Session, doc: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """Answer save/fetch; returns (reply, fds to send, received fds still to close)."""
        op = doc.get("op")
        if op == "save":
            state = doc.get("state")
            if len(fds) != 1 or not isinstance(state, dict):
                return {"ok": False, "error": "save needs a state object and exactly one fd"}, [], fds
            s.save(state, fds[0])  # the fd is kept: not closed by the caller
            log.info("%s: saved state and FUSE fd (save %d)", s.id, s.saves)
            return {"ok": True}, [], []
        if op == "fetch":
            if s.fd < 0:
                return {"ok": False, "error": "no state saved"}, [], fds
            s.fetches += 1
            log.info("%s: handing the FUSE session over (fetch %d)", s.id, s.fetches)
            return {"ok": True, "state": s.state}, [s.fd], fds
        if op == "peek":  # the state alone: a warm standby pre-opens the images it names
            if s.fd < 0:
                return {"ok": False, "error": "no state saved"}, [], fds
            return {"ok": True, "state": s.state}, [], fds
        return {"ok": False, "error": f"unknown op {op!r}"}, [], fds

    # -- the manager's control socket -------------------------------------------------------
    def _control(self, doc: dict[str, Any]) -> dict[str, Any]:
        op = doc.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "dir": self.dir}
        if op == "status":
            return {"ok": True, "pid": os.getpid(),
                    "sessions": {i: s.info() for i, s in self.sessions.items()}}  # fmt: skip
        if op in ("ensure", "remove"):
            daemon_id = doc.get("id")
            if not isinstance(daemon_id, str) or not _ID.match(daemon_id) or daemon_id == "holder":
                return {"ok": False, "error": f"bad daemon id {daemon_id!r}"}
            if op == "ensure":
                return self._ensure(daemon_id)
            s = self.sessions.pop(daemon_id, None)
            if s is None:
                return {"ok": True, "held": False}
            held = s.fd >= 0
            self.sel.unregister(s.listener)
            s.close()
            log.info("%s: removed (%s)", daemon_id, "session dropped" if held else "held nothing")
            return {"ok": True, "held": held}
        if op == "shutdown":
            holding = sorted(i for i, s in self.sessions.items() if s.fd >= 0)
            if holding and not doc.get("force"):
                return {"ok": False, "error": f"still holding the sessions of {', '.join(holding)}"}
            log.info("shutdown requested (dropping %d session(s))", len(holding))
            for s in self.sessions.values():
                self.sel.unregister(s.listener)
                s.close()
            self.sessions.clear()
            self.stopping = True
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _ensure(self, daemon_id: str) -> dict[str, Any]:
        s = self.sessions.get(daemon_id)
        if s is None:
            s = Session(daemon_id, os.path.join(self.dir, f"{daemon_id}.sock"))
            self.sessions[daemon_id] = s
            self.sel.register(s.listener, selectors.EVENT_READ, ("accept", s))
            log.info("%s: serving %s", daemon_id, s.path)
        return {"ok": True, "path": s.path, "has_session": s.fd >= 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nydus-session-holder", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the snapshotter root (sockets in <root>/supervisor)")
    parser.add_argument("--log-file", help="append the log here (default: stderr)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=args.log_file,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    directory = os.path.join(os.path.abspath(args.root), "supervisor")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chdir("/")  # pin no directory of the caller
    lock_fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            print(f"nydus-session-holder: another holder serves {directory}", file=sys.stderr)
            return 3
        raise
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    holder = Holder(directory)
    log.info("serving %s", directory)
    holder.run()
    log.info("exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
