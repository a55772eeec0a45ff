"""Where a fusedev daemon's warm standby is recorded (``[daemon] failover_standby``).

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
import os
from pathlib import Path

import attrs

from nydus_core.control.daemons.client import NydusdApiError, NydusdClient, NydusdUnreachable
from nydus_core.control.daemons.model import DaemonRecord

PID_FILE = "standby.pid"
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
