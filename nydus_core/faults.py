"""Test-only fault injection: make the snapshotter die by SIGKILL at a named step.

``NYDUS_SNAPSHOTTER_CRASH_AT=<step>`` in the snapshotter's environment makes `crash_point`
kill the process (``SIGKILL`` to itself: no ``finally``, no atexit, exactly what ``kill -9``
does) when execution reaches `step`. The crash-consistency tests use it to stop the snapshotter
deterministically in the middle of a recovery and check that the next start-up puts everything
right. Never set it in production; unset, `crash_point` is one dictionary lookup.

A backend names its own steps where it calls `crash_point` (the fusedev backend's are listed in
``nydus_fuse.backend.crash_points``).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_ENV = "NYDUS_SNAPSHOTTER_CRASH_AT"


def crash_point(step: str) -> None:
    """SIGKILL this process if ``$NYDUS_SNAPSHOTTER_CRASH_AT`` names `step` (tests only)."""
    if os.environ.get(CRASH_ENV) != step:
        return
    log.critical("fault injection: killing the snapshotter at step %s", step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
