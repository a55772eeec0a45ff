"""Warm standbys of fusedev daemons (``[daemon] failover_standby``): where they are recorded, and
starting, promoting and stopping them.

A standby is the next generation of a supervised daemon, started ahead of any death with
``--upgrade`` on its own API socket: its interpreter is up, its imports are done and its image is
open, and it waits in state INIT. When the daemon dies, failover drives the standby ``takeover``
→ ``start`` instead of spawning a process, so the pause is the takeover itself (milliseconds)
rather than a Python start-up (hundreds of milliseconds).

The record is a file, not memory: ``socket/<id>/standby.pid`` holds the pid and the socket, so
a restarted snapshotter finds the standby of a daemon it re-adopts (and uses it, or kills it
when the daemon is stopped), and nothing is leaked across restarts. A recorded pid is trusted
only while that process's command line names the standby socket (pid reuse).

The two sockets of a daemon id alternate: the standby gets ``standby.sock`` while the daemon
serves on ``api.sock`` and the other way round after a failover, so a promoted standby keeps its
socket and the daemon record just points at it.

Why the standby does not fetch the FUSE fd ahead of time: it would save one local round trip
(well under a millisecond), but the supervisor's state would be read too early -- a shared
daemon's images attached after that read would be missing in the new generation -- and a second
holder of the session fd keeps a mount alive that nobody may serve any more (a standby left
behind would turn the clean ENOTCONN of a dead session into hung readers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from nydus_core.control.daemons import process
from nydus_core.control.daemons.client import STATE_INIT, NydusdApiError, NydusdClient, NydusdUnreachable
from nydus_core.control.daemons.model import DaemonRecord, Instance
from nydus_core.errors import Unavailable
from nydus_core.faults import crash_point

if TYPE_CHECKING:
    from nydus_fuse.backend.fusedev import FusedevBackend

log = logging.getLogger(__name__)

PID_FILE = "standby.pid"
LISTEN_WAIT = 10.0  # seconds a failover waits for a standby that is still starting
SOCKETS = ("api.sock", "standby.sock")


@attrs.frozen
class Standby:
    pid: int
    api_socket: Path


def socket_for(daemon: DaemonRecord) -> Path:
    """The standby's API socket: the one of the two names the daemon does not use."""
    name = SOCKETS[0] if daemon.api_socket.name == SOCKETS[1] else SOCKETS[1]
    return daemon.api_socket.with_name(name)


def _pid_file(daemon: DaemonRecord) -> Path:
    return daemon.api_socket.parent / PID_FILE


def record(daemon: DaemonRecord, standby: Standby) -> None:
    path = _pid_file(daemon)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{standby.pid} {standby.api_socket}\n")
    os.replace(tmp, path)


def forget(daemon: DaemonRecord) -> None:
    _pid_file(daemon).unlink(missing_ok=True)


def runs(pid: int, named: Path) -> bool:
    """Whether `pid` is a live process with `named` (its API socket, its program) on its command
    line."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return os.fsencode(str(named)) in args


def recorded(daemon: DaemonRecord) -> Standby | None:
    """The recorded standby of `daemon`, whether or not it still runs (None: nothing recorded)."""
    try:
        pid_text, _, sock = _pid_file(daemon).read_text().strip().partition(" ")
        standby = Standby(int(pid_text), Path(sock))
    except (OSError, ValueError):
        return None
    if standby.api_socket == daemon.api_socket or standby.api_socket.parent != daemon.api_socket.parent:
        with contextlib.suppress(OSError):
            forget(daemon)  # stale: it is the daemon itself now, or not one of ours
        return None
    return standby


def is_warm(standby: Standby) -> bool:
    """Whether the standby has its imports done and its image open (``takeover_ready`` in its
    ``GET /api/v1/daemon``, our extension): a daemon answers INIT from its first milliseconds,
    long before a takeover could proceed without waiting."""
    try:
        with NydusdClient(standby.api_socket, timeout=2.0) as client:
            return bool(client.daemon_info().raw.get("takeover_ready"))
    except (NydusdApiError, NydusdUnreachable, OSError):
        return False


def _wait_listening(standby: Standby, timeout: float = LISTEN_WAIT) -> None:
    """Wait (bounded) while a live standby has not bound its API socket yet: it was spawned
    moments before the death and is still importing."""
    deadline = time.monotonic() + timeout
    while not standby.api_socket.exists() and runs(standby.pid, standby.api_socket):
        if time.monotonic() >= deadline:
            return
        time.sleep(0.005)


class Standbys:
    """The standbys of one `FusedevBackend`: a standby is spawned, claimed or stopped by one thread
    at a time."""

    def __init__(self, backend: FusedevBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        # What each daemon was started with in this process, to start its standbys the same way.
        self._launch_args: dict[str, Instance | None] = {}
        self._retired: set[str] = set()  # daemons stopped for good: a standby spawn under way is dropped

    def remember(self, daemon: DaemonRecord, instance: Instance | None) -> None:
        """`daemon` is (re)started with `instance` (its image when dedicated)."""
        with self._lock:
            self._launch_args[daemon.id] = instance
            self._retired.discard(daemon.id)

    def wanted(self, daemon: DaemonRecord) -> bool:
        return self.backend.standby_enabled() and self.backend.supervisor_path(daemon) is not None

    def start(self, daemon: DaemonRecord) -> None:
        """Spawn `daemon`'s next generation with ``--upgrade`` on the other socket, unless one runs
        (a standby of another program, left from before a hot upgrade, is replaced).

        Does not wait for it: failover waits for INIT if it has to use a standby still loading.
        Needs the arguments the daemon was started with in this process; a daemon re-adopted after
        a snapshotter restart keeps the standby recorded before (if any) until its next failover.
        """
        with self._lock:
            if daemon.id not in self._launch_args or daemon.id in self._retired or not self.wanted(daemon):
                return
            instance = self._launch_args[daemon.id]
            current = recorded(daemon)
            if current is not None and runs(current.pid, current.api_socket):
                program = shutil.which(daemon.program) or daemon.program
                if runs(current.pid, Path(program)):
                    return
                log.info("standby of daemon %s runs another program than %s (hot upgrade): replacing it",
                         daemon.id, program)  # fmt: skip
                self._kill(daemon, current)
            sock = socket_for(daemon)
            pid = self.backend.spawn(attrs.evolve(daemon, api_socket=sock, pid=0), instance, ["--upgrade"])
            crash_point("standby-spawned")
            record(daemon, Standby(pid, sock))
            log.info("standby of daemon %s: pid %d on %s", daemon.id, pid, sock)

    def start_later(self, daemon: DaemonRecord) -> None:
        """`start` in a thread: never on the path of a start or a failover."""
        if daemon.id not in self._launch_args:
            return

        def run() -> None:
            try:
                self.start(daemon)
            except Exception:
                log.exception("cannot start a standby for daemon %s (failover will spawn cold)", daemon.id)

        threading.Thread(target=run, name=f"standby-{daemon.id}", daemon=True).start()

    def promote(self, daemon: DaemonRecord) -> bool:
        """Failover to the recorded standby: point the record at it and drive it from the state it
        is in (normally INIT; READY or RUNNING when a snapshotter died in the middle of a
        promotion).

        The standby's record file stays until the daemon record names it (then `recorded` drops
        it): a snapshotter killed meanwhile finds the promoted process again at start-up. False
        (record unchanged) when there is no live standby or it could not be driven.
        """
        from nydus_fuse.backend.failover import drive, resume

        with self._lock:
            found = recorded(daemon)
            if found is None:
                return False
            if not runs(found.pid, found.api_socket):
                log.warning("standby of daemon %s (pid %d) is gone; spawning the replacement cold", daemon.id,
                            found.pid)  # fmt: skip
                forget(daemon)
                found.api_socket.unlink(missing_ok=True)
                return False
            old_socket, old_pid = daemon.api_socket, daemon.pid
            daemon.api_socket, daemon.pid = found.api_socket, found.pid
            _wait_listening(found)  # one still starting is nearer to serving than a cold spawn
            try:
                drive(self.backend, daemon, STATE_INIT)  # the usual case, without asking its state first
                promoted = True
            except NydusdApiError:  # not in INIT: a promotion a dead snapshotter had begun
                promoted = resume(self.backend, daemon)
            except (Unavailable, NydusdUnreachable) as e:
                log.warning("standby of daemon %s (pid %d) failed to take over: %s", daemon.id, found.pid, e)
                promoted = False
            if promoted:
                old_socket.unlink(missing_ok=True)
                return True
            self.backend.kill_now(daemon)
            forget(daemon)
            daemon.api_socket, daemon.pid = old_socket, old_pid
            return False

    def stop(self, daemon: DaemonRecord, *, retire: bool) -> None:
        """Kill `daemon`'s standby (SIGKILL is safe: it has not touched the mount or the session).
        `retire`: the daemon is stopped for good, a standby spawn still under way is dropped too."""
        with self._lock:
            if retire:
                self._retired.add(daemon.id)
                self._launch_args.pop(daemon.id, None)
            found = recorded(daemon)
            if found is not None:
                self._kill(daemon, found)

    def _kill(self, daemon: DaemonRecord, found: Standby) -> None:
        forget(daemon)
        if runs(found.pid, found.api_socket):
            process.kill_now(found.pid, found.api_socket)
            log.info("standby of daemon %s (pid %d) stopped", daemon.id, found.pid)
        found.api_socket.unlink(missing_ok=True)

    def kill_unrecorded_generations(self, daemon: DaemonRecord) -> None:
        """Start-up: kill live processes on another API socket of the daemon's socket directory
        that neither the record nor the standby record names (nothing would ever drive or stop
        them)."""
        standby = recorded(daemon)
        for pid, sock in process.api_socket_processes():
            if sock.parent != daemon.api_socket.parent or sock == daemon.api_socket:
                continue
            if standby is not None and pid == standby.pid and sock == standby.api_socket:
                continue
            log.warning("daemon %s: killing pid %d on %s: no record names it", daemon.id, pid, sock)
            process.kill_now(pid, sock)
