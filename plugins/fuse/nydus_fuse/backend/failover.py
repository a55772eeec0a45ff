"""Failover of a fusedev daemon: a replacement takes the live FUSE session over from the holder.

No clearing of the mount: the holder's dup of the ``/dev/fuse`` fd keeps it alive while nobody
serves it. The replacement (a warm standby if one waits, else a new process spawned with
upstream's command line) is driven ``takeover`` -> ``start``; it replays the saved INIT and
sends ``FUSE_NOTIFY_RESEND``, so the requests in flight at the death are re-issued and readers
see a pause, not an error.

A snapshotter killed in the middle of that leaves a replacement nobody recorded: at the next
start-up `FusedevBackend.reconcile` finds it by its command line (the API socket) and `failover`
resumes it from the state it reached (INIT: takeover and start; READY: start; RUNNING: adopt).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nydus_core.control.daemons import process
from nydus_core.control.daemons.client import (
    STATE_INIT,
    STATE_READY,
    STATE_RUNNING,
    NydusdApiError,
    NydusdUnreachable,
)
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.errors import Unavailable
from nydus_core.faults import crash_point
from nydus_fuse.backend.client import FuseSessionClient

if TYPE_CHECKING:
    from nydus_fuse.backend.fusedev import FusedevBackend

log = logging.getLogger(__name__)

RECOVER_READY_TIMEOUT = 10.0
FAILOVER_ATTEMPTS = 5
EXIT_SETTLE = 1.0  # how long a replacement that stopped answering gets to show it died


def failover(backend: FusedevBackend, daemon: DaemonRecord, instances: Sequence[Instance]) -> bool:
    """Spawn (or promote) a replacement on the live mount and have it take the session over.

    A replacement left by a snapshotter that died mid-failover (``daemon.pid``, set by
    `reconcile`) is resumed first. A replacement that dies while it starts (a resent request that
    kills every daemon) is replaced again, at most `FAILOVER_ATTEMPTS` times: nydusd-py's
    in-flight journal turns such a request into EIO after three deaths, so the attempts end well
    before the limit. False when no takeover happened (the caller then restarts the daemon).
    """
    sup = backend.supervisor_path(daemon)
    if sup is None or not sup.exists():
        return False
    t0 = time.monotonic()
    if resume(backend, daemon):
        log.info("daemon %s: resumed the interrupted failover of pid %d", daemon.id, daemon.pid)
        return True
    backend.kill_now(daemon)  # a hung process that no longer answers (SIGTERM would unmount)
    if backend.standbys.promote(daemon):
        took = (time.monotonic() - t0) * 1000
        log.info("daemon %s failed over to its standby, pid %d, in %.1f ms", daemon.id, daemon.pid, took)
        return True
    dedicated = daemon.mode is DaemonMode.DEDICATED
    for attempt in range(1, FAILOVER_ATTEMPTS + 1):
        daemon.api_socket.unlink(missing_ok=True)
        daemon.pid = backend.spawn(daemon, instances[0] if dedicated else None)
        crash_point("failover-spawned")
        try:
            if not backend.wait_ready(daemon, RECOVER_READY_TIMEOUT, STATE_INIT):
                raise Unavailable(f"daemon {daemon.id} did not reach INIT")
            drive(backend, daemon, STATE_INIT)
        except (Unavailable, NydusdApiError, NydusdUnreachable) as e:
            # A daemon killed while it answers closes its socket before its exit status exists.
            died = process.gone_within(daemon.pid, EXIT_SETTLE)
            log.error("failover of daemon %s, attempt %d: %s", daemon.id, attempt, e)
            backend.kill_now(daemon)
            if died:
                continue  # it died serving: the journal has counted what was in flight
            return False
        took = (time.monotonic() - t0) * 1000
        log.info("daemon %s failed over to pid %d in %.0f ms (attempt %d)", daemon.id, daemon.pid, took,
                 attempt)  # fmt: skip
        return True
    log.error("daemon %s: %d replacements died in a row; giving failover up", daemon.id, FAILOVER_ATTEMPTS)
    return False


def drive(backend: FusedevBackend, daemon: DaemonRecord, state: str) -> None:
    """Take a replacement from `state` (INIT or READY) to RUNNING: takeover, start, sendfd."""
    t0 = time.monotonic()
    with FuseSessionClient(daemon.api_socket, timeout=RECOVER_READY_TIMEOUT) as client:
        if state == STATE_INIT:
            client.takeover()
            crash_point("failover-taken-over")
        t_taken = time.monotonic()
        client.start()
    t_started = time.monotonic()
    if not backend.wait_ready(daemon, RECOVER_READY_TIMEOUT):
        raise Unavailable(f"daemon {daemon.id} did not reach RUNNING after takeover")
    crash_point("failover-started")
    log.debug("daemon %s, pid %d: takeover %.1f ms, start (serving) %.1f ms, RUNNING + sendfd %.1f ms",
              daemon.id, daemon.pid, (t_taken - t0) * 1000, (t_started - t_taken) * 1000,
              (time.monotonic() - t_started) * 1000)  # fmt: skip


def resume(backend: FusedevBackend, daemon: DaemonRecord) -> bool:
    """Finish a failover a dead snapshotter began: ``daemon.pid`` is a live replacement of ours
    in INIT (spawned), READY (took the session over) or RUNNING (serves, was not recorded)."""
    pid = daemon.pid
    if pid <= 0 or process.exited(pid) or not backend.is_ours(pid, daemon):
        return False
    try:
        with FuseSessionClient(daemon.api_socket, timeout=3.0) as client:
            state = client.state()
        log.info("daemon %s: found replacement pid %d in state %s", daemon.id, pid, state)
        if state == STATE_RUNNING:
            return backend.wait_ready(daemon, RECOVER_READY_TIMEOUT)  # sends its session to the holder
        if state not in (STATE_INIT, STATE_READY):
            return False
        drive(backend, daemon, state)
        return True
    except (Unavailable, NydusdApiError, NydusdUnreachable, OSError) as e:
        log.warning("daemon %s: cannot resume pid %d (%s); replacing it", daemon.id, pid, e)
        return False
