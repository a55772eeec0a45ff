"""The in-flight journal's verdicts (nydus_fuse.daemon.journal), on its real mmap file.

A daemon death is simulated by leaving entries in the journal and judging it as the next daemon
does at a takeover. The scenario is the one that made innocent readers fail: a read of ``big``
is in flight beside the poison request at every death.
"""

from __future__ import annotations

from pathlib import Path

from nydus_fuse.daemon.journal import DEFAULT_LIMIT, Journal, acquit, judge

POISON = ("read", 7)
INNOCENT = ("read", 3)


def _die_with(path: Path, *requests: tuple[str, int]) -> None:
    """A daemon generation that had `requests` in flight when it was killed."""
    journal = Journal(str(path / "j.inflight"))
    for op, ino in requests:
        journal.enter(op, ino)
    journal.close()


def _takeover(path: Path) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    journal = Journal(str(path / "j.inflight"))
    try:
        return judge(journal, str(path / "j.poison.json"))
    finally:
        journal.close()


def test_poison_alone_reaches_the_limit_innocent_neighbour_does_not(tmp_path: Path) -> None:
    _die_with(tmp_path, POISON, INNOCENT)  # first death: both in flight, nobody knows which
    poisoned, suspects = _takeover(tmp_path)
    assert poisoned == set() and suspects == {POISON, INNOCENT}
    # suspects run one at a time and are journalled only while running: the poison kills alone
    _die_with(tmp_path, POISON)
    poisoned, suspects = _takeover(tmp_path)
    assert poisoned == set() and suspects == {POISON}  # the innocent read dropped back to zero
    for _ in range(DEFAULT_LIMIT - 2):
        _die_with(tmp_path, POISON, INNOCENT)  # the innocent read is no suspect now: runs beside it
        poisoned, suspects = _takeover(tmp_path)
    assert poisoned == {POISON}
    assert INNOCENT not in poisoned and suspects == {INNOCENT}
    # later takeovers keep the verdict; a clean one charges nothing new
    poisoned, suspects = _takeover(tmp_path)
    assert poisoned == {POISON} and suspects == set()


def test_journal_is_cleared_by_the_judge(tmp_path: Path) -> None:
    _die_with(tmp_path, INNOCENT)
    _takeover(tmp_path)
    journal = Journal(str(tmp_path / "j.inflight"))
    try:
        assert journal.entries() == []
    finally:
        journal.close()


def test_a_read_in_flight_at_every_death_is_acquitted_in_between(tmp_path: Path) -> None:
    """The container that reads a big file in a loop has a read of it in flight at every kill -9
    of an operator (20 kills in the failover test). Each replacement runs it as a suspect, alone;
    it completes, so it is acquitted (count reset), and it is never poisoned however many kills
    follow. Without the acquittal its count piled up and the third kill made it EIO for good."""
    counts = str(tmp_path / "j.poison.json")
    for _ in range(3 * DEFAULT_LIMIT):
        _die_with(tmp_path, INNOCENT)
        poisoned, suspects = _takeover(tmp_path)
        assert poisoned == set() and suspects == {INNOCENT}
        acquit(counts, *INNOCENT)  # the suspect ran alone in the new daemon and completed
    # a request that really kills every daemon is never acquitted: it reaches the limit alone
    for _ in range(DEFAULT_LIMIT):
        _die_with(tmp_path, POISON, INNOCENT)
        poisoned, suspects = _takeover(tmp_path)
        acquit(counts, *INNOCENT)
    assert poisoned == {POISON} and INNOCENT not in poisoned
    acquit(str(tmp_path / "missing.json"), *INNOCENT)  # no counts yet: nothing to do
