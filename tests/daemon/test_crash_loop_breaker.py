"""The manager's crash-loop breaker under ``failover`` counts quick deaths in a row only.

Twenty kill -9s of a daemon that serves in between (issue 5's container test) are not a crash
loop, and giving the mount up would break every container on it (ENOTCONN); replacements that
die right after they took over (a request that kills every daemon, a daemon that cannot start)
are. The end-to-end versions are in ``tests/fuse/test_failover_manager.py`` and
``tests/e2e/test_e2e_failover.py``.
"""

from __future__ import annotations

import attrs

from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.manager import FAILOVER_MAX_DEATHS, FAILOVER_SETTLE, DaemonManager
from nydus_core.plugins import build_plugin_manager


def _manager(nydus_config: SnapshotterConfig) -> DaemonManager:
    config = attrs.evolve(nydus_config, daemon=attrs.evolve(nydus_config.daemon, recover_policy="failover"))
    return DaemonManager(config, build_plugin_manager([], entry_points=False, env={}))


def test_quick_deaths_in_a_row_trip_the_breaker(nydus_config: SnapshotterConfig) -> None:
    mgr = _manager(nydus_config)
    try:
        t = 1000.0
        counts = [mgr.note_death("d1", now=t)]  # the first daemon: a new series
        for _ in range(FAILOVER_MAX_DEATHS):
            mgr._recovered_at["d1"] = t  # a replacement took over ...
            t += FAILOVER_SETTLE / 10
            counts.append(mgr.note_death("d1", now=t))  # ... and died at once
        assert counts == list(range(1, FAILOVER_MAX_DEATHS + 2))
        assert counts[-1] > mgr.failover_max_deaths
    finally:
        mgr.close()


def test_a_settled_replacement_starts_a_new_series(nydus_config: SnapshotterConfig) -> None:
    mgr = _manager(nydus_config)
    try:
        t = 1000.0
        for _ in range(3 * FAILOVER_MAX_DEATHS):
            mgr._recovered_at["d1"] = t  # each replacement served longer than the settle time
            t += FAILOVER_SETTLE + 0.01
            assert mgr.note_death("d1", now=t) == 1
        mgr._recovered_at["d1"] = t
        assert mgr.note_death("d1", now=t + 0.01) == 2, "a quick death after a settled one is the 2nd"
    finally:
        mgr.close()
