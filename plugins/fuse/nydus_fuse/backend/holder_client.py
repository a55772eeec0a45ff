"""The daemon manager's side of the session holder (`nydus_fuse.holder`).

`SessionHolder` starts the holder process of a snapshotter root when it does not answer, and
talks to it over its control socket: ``ensure(id).path``, ``get(id).has_state``, ``remove(id)``,
``close()``. The sessions live in a process that outlives the snapshotter, so ``close()`` leaves
it running on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nydus_fuse import holder as holder_module
from nydus_fuse.supervisor import SupervisorError, _recv, _send

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
CONTROL_TIMEOUT = 5.0


class HolderError(SupervisorError):
    """The session holder could not be started or reached, or refused a request."""


class HeldSession:
    """One daemon's entry in the holder: its supervisor socket ``path`` and ``has_state``."""

    def __init__(self, owner: SessionHolder, daemon_id: str, path: Path) -> None:
        self.owner = owner
        self.daemon_id = daemon_id
        self.path = path

    @property
    def has_state(self) -> bool:
        """Whether the holder has the daemon's FUSE session (asked each time: it lives elsewhere)."""
        return self.owner.holds(self.daemon_id)

    def info(self) -> dict[str, Any] | None:
        return self.owner.status().get(self.daemon_id)


class SessionHolder:
    """The holder of ``<root>/supervisor``: start on demand, ensure/remove/status by daemon id."""

    def __init__(self, root: Path, log_file: Path | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / "supervisor"
        self.control = self.dir / holder_module.CONTROL_NAME
        self.log_file = log_file
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self.known_pid = 0  # the holder's pid as last seen (for a pidfd watch), 0 if unknown

    def path_of(self, daemon_id: str) -> Path:
        return self.dir / f"{daemon_id}.sock"

    # -- the process ----------------------------------------------------------------------
    def request(self, doc: dict[str, Any], *, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """One control exchange with the running holder; `HolderError` if it does not answer."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.control))
            _send(sock, doc, [])
            reply, fds = _recv(sock)
        except (OSError, SupervisorError) as e:
            raise HolderError(f"session holder {self.control} does not answer: {e}") from e
        finally:
            sock.close()
        for fd in fds:
            os.close(fd)
        if not reply.get("ok"):
            raise HolderError(f"session holder refused {doc.get('op')}: {reply.get('error')}")
        return reply

    def pid(self) -> int | None:
        """The pid of the running holder, ``None`` when none answers."""
        try:
            pid = int(self.request({"op": "ping"}, timeout=1.0)["pid"])
        except HolderError:
            return None
        self.known_pid = pid
        return pid

    def ensure_running(self) -> int:
        """Start the holder unless one answers; its pid."""
        with self._lock:
            pid = self.pid()
            if pid is not None:
                return pid
            self._reap()
            self.known_pid = 0
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            out = None
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                out = open(self.log_file, "ab")  # noqa: SIM115
            argv = [sys.executable, "-I", holder_module.__file__, "--root", str(self.root)]
            try:
                self._child = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out if out is not None else subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the snapshotter and its process group
                    close_fds=True,
                    cwd="/",
                )
            finally:
                if out is not None:
                    out.close()
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                pid = self.pid()
                if pid is not None:
                    log.info("session holder for %s running as pid %d", self.root, pid)
                    return pid
                rc = self._child.poll()
                if rc is not None and rc != 3:  # 3: another holder won the lock; it will answer
                    raise HolderError(f"session holder exited with status {rc} at start; see {self.log_file}")
                if time.monotonic() > deadline:
                    raise HolderError(f"session holder did not answer within {START_TIMEOUT:g}s")
                time.sleep(0.02)

    def _reap(self) -> None:
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    # -- per daemon -----------------------------------------------------------------------
    def ensure(self, daemon_id: str) -> HeldSession:
        """Have the holder serve the daemon's supervisor socket (starting the holder if needed)."""
        try:
            reply = self.request({"op": "ensure", "id": daemon_id})
        except HolderError:
            self.ensure_running()
            reply = self.request({"op": "ensure", "id": daemon_id})
        return HeldSession(self, daemon_id, Path(reply["path"]))

    def get(self, daemon_id: str) -> HeldSession | None:
        """The daemon's entry if the holder serves it (``None`` also when no holder answers)."""
        if daemon_id not in self.status():
            return None
        return HeldSession(self, daemon_id, self.path_of(daemon_id))

    def status(self) -> dict[str, dict[str, Any]]:
        """Daemon id → what the holder keeps for it; empty when no holder answers."""
        try:
            sessions = self.request({"op": "status"})["sessions"]
        except HolderError:
            return {}
        return dict(sessions) if isinstance(sessions, dict) else {}

    def holds(self, daemon_id: str) -> bool:
        return bool(self.status().get(daemon_id, {}).get("has_session"))

    def remove(self, daemon_id: str) -> None:
        """Drop the daemon's socket and session, and what its daemons kept beside the socket
        (the in-flight journal and poison counts of ``nydusd-py``)."""
        with contextlib.suppress(HolderError):
            self.request({"op": "remove", "id": daemon_id})
        for suffix in (".inflight", ".poison.json"):
            (self.dir / f"{daemon_id}{suffix}").unlink(missing_ok=True)

    def shutdown(self, *, force: bool = False) -> bool:
        """Stop the holder; refused (False) while it holds a session, unless `force`."""
        try:
            self.request({"op": "shutdown", "force": force})
        except HolderError as e:
            log.info("%s", e)
            return False
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(5)
            self._reap()
        return True

    def close(self) -> None:
        """Nothing to do: the holder outlives the snapshotter on purpose (that is its point)."""
