"""The fusedev backend's test-only crash points (``NYDUS_SNAPSHOTTER_CRASH_AT``, `nydus_core.faults`).

In the order a failover passes them:

* ``failover-noticed``: the daemon's death was noticed, nothing was done about it yet;
* ``failover-spawned``: a replacement process was spawned, not recorded, not yet driven;
* ``failover-taken-over``: the replacement took the FUSE session over (READY), ``start`` not sent;
* ``failover-started``: the replacement serves (RUNNING), the record still names the dead pid.

In the order a hot upgrade passes them (`nydus_fuse.backend.upgrade`):

* ``upgrade-spawned``: the new program waits in INIT on the next API socket, unrecorded;
* ``upgrade-taken-over``: it took the session over (READY); the old daemon still serves;
* ``upgrade-old-exited``: the old daemon has let go of the session, the new one was not started;
* ``upgrade-started``: the new one serves (RUNNING), the record still names the old daemon.

With ``[daemon] failover_standby``:

* ``standby-spawned``: a warm standby was spawned in the background, not yet recorded.
"""

from __future__ import annotations

STEPS = ("failover-noticed", "failover-spawned", "failover-taken-over", "failover-started")
UPGRADE_STEPS = ("upgrade-spawned", "upgrade-taken-over", "upgrade-old-exited", "upgrade-started")
STANDBY_SPAWNED = "standby-spawned"
