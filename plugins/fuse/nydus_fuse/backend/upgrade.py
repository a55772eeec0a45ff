"""Hot upgrade of a fusedev daemon to another program (`FusedevBackend.upgrade`).

Upstream's order (nydus-snapshotter ``upgradeNydusDaemon``), on a daemon whose FUSE session a
supervisor holds (``recover_policy = "failover"``):

1. ``sendfd``: the old daemon pushes its current state and the ``/dev/fuse`` fd to the supervisor;
2. the new program is spawned with ``--upgrade`` on the next API socket (``api.sock`` ->
   ``api1.sock`` -> ``api2.sock`` ... in the same directory) and waits in ``INIT``;
3. ``takeover``: it fetches state and fd from the supervisor (``READY``; nydusd-py re-opens the
   images with their old inode slots, so the kernel's nodeids stay valid);
4. ``exit``: the old daemon stops serving and leaves the mount;
5. ``start``: the new daemon replays the saved INIT and sends ``FUSE_NOTIFY_RESEND`` (what the old
   one had read but not answered -- ``pyfuse3.terminate`` can drop one request -- is queued again),
   then reports ``RUNNING`` and, being supervised, is told ``sendfd`` in turn.

Readers only see a pause between 4 and 5. Before 5 we wait until the old process has closed its
``/dev/fuse`` fds (seen in ``/proc/<pid>/fd``), so the RESEND cannot race a request the old
daemon is still reading; its interpreter's teardown (and the reaping) happens after 5.

Failure before step 4 kills the new process and leaves the old daemon serving (an `UpgradeError`
that says so). Failure after it (the new program dies while starting) fails the session back to
the old program through the regular failover path, so a daemon serves either way.

On success the record is updated in place (``api_socket``, ``pid``, ``program``, ``version``):
the pid-reuse guard and the liveness probe follow the new API socket, and a later failover
respawns the *new* program.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from nydus_core.control.daemons import process
from nydus_core.control.daemons.client import (
    STATE_INIT,
    STATE_READY,
    NydusdApiError,
    NydusdClient,
    NydusdUnreachable,
)
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.errors import FailedPrecondition, Unavailable
from nydus_core.faults import crash_point
from nydus_fuse.backend.client import FuseSessionClient

if TYPE_CHECKING:
    from nydus_fuse.backend.fusedev import FusedevBackend

log = logging.getLogger(__name__)

STEP_TIMEOUT = 10.0  # INIT, READY, RUNNING of the new daemon
EXIT_TIMEOUT = 10.0  # the old daemon leaving after ``exit`` (then SIGKILL: the supervisor holds the fd)

_API_SOCKET = re.compile(r"^api(\d*)\.sock$")


class UpgradeError(Unavailable):
    """A daemon could not be upgraded; the message says which program serves it now."""


def next_api_socket(current: Path) -> Path:
    """Upstream's naming: ``api.sock`` -> ``api1.sock`` -> ``api2.sock``, same directory.

    A name that exists already (a socket another generation listens on) is skipped, so the new
    daemon never unlinks a live daemon's socket.
    """
    m = _API_SOCKET.match(current.name)
    n = int(m.group(1) or 0) if m else 0
    while True:
        n += 1
        candidate = current.with_name(f"api{n}.sock")
        if not candidate.exists():
            return candidate


def version_matches(wanted: str, package_ver: str) -> bool:
    """Whether the reported ``package_ver`` is the `wanted` one: equal, or equal to its last word
    (``nydusd-py 0.2.0`` matches ``0.2.0``); an empty `wanted` matches anything."""
    if not wanted:
        return True
    return wanted in (package_ver, package_ver.rsplit(" ", 1)[-1])


def _discard(new: DaemonRecord) -> None:
    """Kill a new daemon that did not take over; it never served, so SIGKILL is enough (and it
    never unmounts: an ``--upgrade`` daemon in INIT/READY has not touched the mount)."""
    process.kill_now(new.pid, new.api_socket)
    new.api_socket.unlink(missing_ok=True)


def holds_fuse_device(pid: int) -> bool:
    """Whether process `pid` has ``/dev/fuse`` open (a zombie or a gone process has nothing open)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
    return False


def _wait_off_device(pid: int, timeout: float) -> bool:
    """Wait until `pid` has closed its ``/dev/fuse`` fds (or is gone): from then on it reads no
    request, so the new daemon's RESEND cannot race it. Sooner than the process's exit by the
    interpreter's teardown."""
    deadline = time.monotonic() + timeout
    while holds_fuse_device(pid) and not process.exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _retire(old: DaemonRecord) -> None:
    """Step 4: the old daemon leaves without unmounting; SIGKILL if it does not let go of the
    session in time (harmless then: the supervisor and the new daemon hold it, RESEND follows)."""
    try:
        with NydusdClient(old.api_socket, timeout=STEP_TIMEOUT) as client:
            client.exit()
    except (NydusdApiError, NydusdUnreachable) as e:
        log.warning("daemon %s (pid %d) refused exit (%s); killing it", old.id, old.pid, e)
        process.kill_now(old.pid, old.api_socket)
        return
    if not _wait_off_device(old.pid, EXIT_TIMEOUT):
        log.warning("daemon %s (pid %d) still serves %gs after exit; killing it", old.id, old.pid,
                    EXIT_TIMEOUT)  # fmt: skip
        process.kill_now(old.pid, old.api_socket)


def upgrade(
    backend: FusedevBackend, daemon: DaemonRecord, instances: Sequence[Instance], program: str, version: str
) -> None:
    """Move `daemon` onto `program` without unmounting; see the module docstring for the steps."""
    sup = backend.supervisor_path(daemon)
    if sup is None or not sup.exists():
        raise FailedPrecondition(
            f"daemon {daemon.id} has no supervisor holding its FUSE session: a hot upgrade needs "
            f'recover_policy = "failover" when the daemon was started'
        )
    dedicated = daemon.mode is DaemonMode.DEDICATED
    if dedicated and not instances:
        raise FailedPrecondition(f"dedicated daemon {daemon.id} has no recorded image for a new program")
    t0 = time.monotonic()
    # 1. the supervisor gets the session as it is now
    try:
        with FuseSessionClient(daemon.api_socket, timeout=STEP_TIMEOUT) as client:
            client.send_fd()
    except (NydusdApiError, NydusdUnreachable) as e:
        raise UpgradeError(f"daemon {daemon.id} (pid {daemon.pid}) did not hand its session to the "
                           f"supervisor, not upgraded: {e}") from e  # fmt: skip
    # 2. the new program, waiting in INIT on the next socket
    new = attrs.evolve(daemon, api_socket=next_api_socket(daemon.api_socket), program=program, pid=0,
                       version="")  # fmt: skip
    keeps = f"daemon {daemon.id} keeps serving with {daemon.program} (pid {daemon.pid})"
    try:
        new.pid = backend.spawn(new, instances[0] if dedicated else None, ["--upgrade"])
        if not backend.wait_ready(new, STEP_TIMEOUT, STATE_INIT):
            raise Unavailable(f"{program} (pid {new.pid}) did not reach INIT within {STEP_TIMEOUT:g}s")
        crash_point("upgrade-spawned")
        if not version_matches(version, new.version):
            raise FailedPrecondition(f"{program} reports version {new.version!r}, not {version!r}")
        # 3. takeover
        with FuseSessionClient(new.api_socket, timeout=STEP_TIMEOUT) as client:
            client.takeover()
        if not backend.wait_ready(new, STEP_TIMEOUT, STATE_READY):
            raise Unavailable(f"{program} (pid {new.pid}) did not reach READY after takeover")
        crash_point("upgrade-taken-over")
    except Exception as e:
        _discard(new)
        raise UpgradeError(f"upgrade of daemon {daemon.id} to {program} failed, {keeps}: {e}") from e
    # 4. the old daemon goes; from here on the new one must serve
    t_exit = time.monotonic()
    _retire(daemon)
    t_off = time.monotonic()
    crash_point("upgrade-old-exited")
    # 5. start (INIT replay + RESEND), then RUNNING and sendfd
    try:
        with NydusdClient(new.api_socket, timeout=STEP_TIMEOUT) as client:
            client.start()
        t_start = time.monotonic()
        # Off the readers' path: the old process finishes leaving (reaped if it is our child) and
        # its socket goes before RUNNING, where a standby of the new program may be given its name.
        if not process.gone_within(daemon.pid, EXIT_TIMEOUT):
            process.kill_now(daemon.pid, daemon.api_socket)
        if daemon.api_socket != new.api_socket:
            daemon.api_socket.unlink(missing_ok=True)
        if not backend.wait_ready(new, STEP_TIMEOUT):
            raise Unavailable(f"{program} (pid {new.pid}) did not reach RUNNING after start")
        crash_point("upgrade-started")
    except Exception as e:
        _discard(new)
        log.error("daemon %s: %s died starting after the old daemon left (%s); failing back to %s",
                  daemon.id, program, e, daemon.program)  # fmt: skip
        from nydus_fuse.backend.failover import failover

        back = failover(backend, daemon, instances)  # same record: old program, old socket
        where = f"{daemon.program} serves again (pid {daemon.pid})" if back else (
            "the fail-back failed too; the liveness monitor recovers it per recover_policy")
        raise UpgradeError(f"upgrade of daemon {daemon.id} to {program} failed after the old daemon "
                           f"exited ({e}); {where}") from e  # fmt: skip
    daemon.api_socket, daemon.pid = new.api_socket, new.pid
    daemon.program, daemon.version = program, new.version
    ms = [(t - t_exit) * 1000 for t in (t_off, t_start)] + [(time.monotonic() - t0) * 1000]
    log.info("daemon %s upgraded to %s (%s), pid %d on %s: exit -> old daemon off the device %.0f ms -> "
             "new one started %.0f ms (readers' pause); %.0f ms in all", daemon.id, program,
             daemon.version or "?", daemon.pid, daemon.api_socket, *ms)  # fmt: skip


def stray_generations(daemon: DaemonRecord) -> list[int]:
    """Live processes of an upgrade that did not finish: started on another ``api<N>.sock`` of the
    daemon's socket directory than the recorded one (a warm standby never has such a name)."""
    return [
        pid
        for pid, sock in process.api_socket_processes()
        if sock.parent == daemon.api_socket.parent and sock != daemon.api_socket
        and re.fullmatch(r"api\d+\.sock", sock.name)
    ]


def kill_stray_generations(daemon: DaemonRecord) -> None:
    """Start-up, before the rest of the reconcile: a snapshotter killed during a hot upgrade
    leaves the new program's process unrecorded (its record changes only at the end). It is
    killed -- the session is safe in the supervisor, and the record's daemon, or its failover to
    the *old* program, serves -- so an interrupted upgrade is rolled back, never half done."""
    for pid in stray_generations(daemon):
        flag = process.flag_value(pid, "--apisock")
        log.warning("daemon %s: killing pid %d (on %s) left by an interrupted hot upgrade", daemon.id, pid,
                    flag)  # fmt: skip
        if flag is not None:
            process.kill_now(pid, flag)
            Path(flag).unlink(missing_ok=True)
