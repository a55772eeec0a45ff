"""The crash-loop breaker of ``failover``: when to stop taking a dying daemon's session over.

The per-request breaker is in the daemon (a request in flight at too many deaths is answered EIO:
``nydus_fuse.daemon.journal``); this one bounds the rest. More than `max_deaths` deaths within
`window` seconds and failover is given up (the daemon is forgotten, as under ``none``). Only
deaths in a row count: a replacement that stayed up `settle` seconds was serving (a crash loop
dies on the resent request or while it starts, within milliseconds), so its death starts a new
count. Without that, an operator's kill -9 now and then -- or twenty in a row, each after the
failover finished -- would end in giving the mount up: ENOTCONN in every container on it.

Kept in memory: a snapshotter restart starts the count again, which at worst allows
`max_deaths` more takeovers.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

MAX_DEATHS = 10
WINDOW = 60.0
SETTLE = 0.5


class CrashLoopBreaker:
    """Deaths and takeovers per daemon id; thread safe."""

    def __init__(self, max_deaths: int = MAX_DEATHS, window: float = WINDOW, settle: float = SETTLE) -> None:
        self.max_deaths = max_deaths
        self.window = window
        self.settle = settle
        self._lock = threading.Lock()
        self._recovered_at: dict[str, float] = {}  # daemon id -> when its last replacement took over
        self._deaths: defaultdict[str, deque[float]] = defaultdict(deque)

    def note_death(self, daemon_id: str, now: float | None = None) -> int:
        """Record one death; how many quick deaths in a row happened within the last `window`
        seconds. The death of a daemon never replaced before, or of a replacement that had been
        up `settle` seconds, starts a new count."""
        t = time.monotonic() if now is None else now
        with self._lock:
            deaths = self._deaths[daemon_id]
            since = self._recovered_at.get(daemon_id)
            if since is None or t - since >= self.settle:
                deaths.clear()
            deaths.append(t)
            while deaths and deaths[0] < t - self.window:
                deaths.popleft()
            return len(deaths)

    def note_recovered(self, daemon_id: str, now: float | None = None) -> None:
        with self._lock:
            self._recovered_at[daemon_id] = time.monotonic() if now is None else now

    def tripped(self, count: int) -> bool:
        return count > self.max_deaths

    def forget(self, daemon_id: str) -> None:
        with self._lock:
            self._deaths.pop(daemon_id, None)
            self._recovered_at.pop(daemon_id, None)
