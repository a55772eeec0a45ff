"""The fusedev backend's crash-loop breaker under ``failover`` counts quick deaths in a row only.

Twenty kill -9s of a daemon that serves in between (issue 5's container test) are not a crash
loop, and giving the mount up would break every container on it (ENOTCONN); replacements that
die right after they took over (a request that kills every daemon, a daemon that cannot start)
are. The end-to-end versions are in ``test_failover_manager.py`` and ``e2e/test_e2e_failover.py``.
"""

from __future__ import annotations

from nydus_fuse.backend.crash_loop import MAX_DEATHS, SETTLE, CrashLoopBreaker


def test_quick_deaths_in_a_row_trip_the_breaker() -> None:
    breaker = CrashLoopBreaker()
    t = 1000.0
    counts = [breaker.note_death("d1", now=t)]  # the first daemon: a new series
    for _ in range(MAX_DEATHS):
        breaker.note_recovered("d1", now=t)  # a replacement took over ...
        t += SETTLE / 10
        counts.append(breaker.note_death("d1", now=t))  # ... and died at once
    assert counts == list(range(1, MAX_DEATHS + 2))
    assert breaker.tripped(counts[-1])
    assert not breaker.tripped(counts[-2])


def test_a_settled_replacement_starts_a_new_series() -> None:
    breaker = CrashLoopBreaker()
    t = 1000.0
    for _ in range(3 * MAX_DEATHS):
        breaker.note_recovered("d1", now=t)  # each replacement served longer than the settle time
        t += SETTLE + 0.01
        assert breaker.note_death("d1", now=t) == 1
    breaker.note_recovered("d1", now=t)
    assert breaker.note_death("d1", now=t + 0.01) == 2, "a quick death after a settled one is the 2nd"


def test_deaths_outside_the_window_do_not_count() -> None:
    breaker = CrashLoopBreaker(max_deaths=2, window=10.0, settle=600.0)
    breaker.note_recovered("d1", now=0.0)
    assert [breaker.note_death("d1", now=t) for t in (1.0, 2.0, 30.0)] == [1, 2, 1]
    breaker.forget("d1")
    assert breaker.note_death("d1", now=31.0) == 1, "a forgotten daemon starts over"
