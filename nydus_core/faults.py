"""Test-only fault injection: make the snapshotter die by SIGKILL at a named step.

``NYDUS_SNAPSHOTTER_CRASH_AT=<step>`` in the snapshotter's environment makes `crash_point`
kill the process (``SIGKILL`` to itself: no ``finally``, no atexit, exactly what ``kill -9``
does) when execution reaches `step`. The crash-consistency tests use it to stop the snapshotter
deterministically in the middle of a failover and check that the next start-up puts everything
right. Never set it in production; unset, `crash_point` is one dictionary lookup.

Steps (in the order a failover passes them):

* ``failover-noticed``: the daemon's death was noticed, nothing was done about it yet;
* ``failover-spawned``: a replacement process was spawned, not recorded, not yet driven;
* ``failover-taken-over``: the replacement took the FUSE session over (READY), ``start`` not sent;
* ``failover-started``: the replacement serves (RUNNING), the record still names the dead pid.

And in the order a hot upgrade passes them (`nydus_core.builtin.nydusd_upgrade`):

* ``upgrade-spawned``: the new program waits in INIT on the next API socket, unrecorded;
* ``upgrade-taken-over``: it took the session over (READY); the old daemon still serves;
* ``upgrade-old-exited``: the old daemon has let go of the session, the new one was not started;
* ``upgrade-started``: the new one serves (RUNNING), the record still names the old daemon.

And with ``[daemon] failover_standby``:

* ``standby-spawned``: a warm standby was spawned in the background, not yet recorded.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_ENV = "NYDUS_SNAPSHOTTER_CRASH_AT"
STEPS = ("failover-noticed", "failover-spawned", "failover-taken-over", "failover-started")
UPGRADE_STEPS = ("upgrade-spawned", "upgrade-taken-over", "upgrade-old-exited", "upgrade-started")
STANDBY_SPAWNED = "standby-spawned"


def crash_point(step: str) -> None:
    """SIGKILL this process if ``$NYDUS_SNAPSHOTTER_CRASH_AT`` names `step` (tests only)."""
    if os.environ.get(CRASH_ENV) != step:
        return
    log.critical("fault injection: killing the snapshotter at step %s", step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
