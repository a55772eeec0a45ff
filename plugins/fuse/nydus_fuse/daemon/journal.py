"""The in-flight journal: which requests a daemon was handling when it died (the poison breaker).

With ``FUSE_NOTIFY_RESEND`` a request that crashes the daemon is handed to every replacement,
which crashes too: a crash loop. So a supervised daemon records each request it is handling,
as (operation, inode), in a small file mapped shared into memory -- the bytes survive a
``kill -9`` without a syscall per request. A daemon taking the session over reads the journal of
the dead one before it serves: every entry found there was in flight at the death. An entry that
was in flight at `limit` consecutive deaths is *poisoned*: from then on that operation on that
inode is answered EIO at once, and everything else is served as usual. Counts live in a JSON
file beside the journal and are reset for entries that were not in flight at the last death.

Keys are coarse on purpose: (op, inode) needs no request payload, and for ``read`` it names
the file. Innocent requests in flight beside the poison are charged too, so the daemon runs
*suspects* (keys charged at the last death but not poisoned) one at a time, and records a suspect
in the journal only once it runs: at the next death exactly one suspect is charged again, the
others drop back to zero, and a suspect that completes is acquitted: dropped from the suspects and
its count in the JSON file reset (`acquit`). A poison request therefore reaches `limit` alone;
an innocent one -- also one that is in flight at every death, like the read of a big file a
container reads in a loop -- is never charged twice without having been acquitted in between.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct

log = logging.getLogger(__name__)

SLOTS = 256
SLOT = struct.Struct("<IIQ")  # op index + 1 (0: free), reserved, inode
OPS = ("lookup", "getattr", "readlink", "opendir", "readdir", "open", "read", "getxattr", "listxattr",
       "statfs", "access", "other")  # fmt: skip
DEFAULT_LIMIT = 3


class Journal:
    """Slots of requests in progress, in a shared mapping of `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, SLOTS * SLOT.size)
            self._map = mmap.mmap(fd, SLOTS * SLOT.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._free = list(range(SLOTS - 1, -1, -1))

    def entries(self) -> list[tuple[str, int]]:
        """What the journal holds (the requests in flight when its last writer stopped)."""
        found = []
        for i in range(SLOTS):
            op, _, ino = SLOT.unpack_from(self._map, i * SLOT.size)
            if op:
                found.append((OPS[min(op, len(OPS)) - 1], ino))
        return found

    def clear(self) -> None:
        self._map[:] = bytes(len(self._map))
        self._free = list(range(SLOTS - 1, -1, -1))

    def enter(self, op: str, ino: int) -> int:
        """Record a request; returns its slot (-1 when all are busy: then it goes unrecorded)."""
        if not self._free:
            return -1
        slot = self._free.pop()
        idx = OPS.index(op) + 1 if op in OPS else len(OPS)
        SLOT.pack_into(self._map, slot * SLOT.size, idx, 0, ino & 0xFFFFFFFFFFFFFFFF)
        return slot

    def leave(self, slot: int) -> None:
        if slot >= 0:
            SLOT.pack_into(self._map, slot * SLOT.size, 0, 0, 0)
            self._free.append(slot)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


def judge(
    journal: Journal, counts_path: str, limit: int = DEFAULT_LIMIT
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """At a takeover: charge the dead daemon's in-flight requests; returns (poisoned, suspects).

    Suspects were in flight at the last death and are below `limit`. Clears the journal for the
    new daemon.
    """
    old: dict[str, int] = {}
    try:
        with open(counts_path) as f:
            doc = json.load(f)
        if isinstance(doc, dict):
            old = {str(k): int(v) for k, v in doc.items()}
    except (OSError, ValueError, TypeError):
        pass
    counts: dict[str, int] = {}
    for op, ino in journal.entries():
        key = f"{op}:{ino}"
        counts[key] = old.get(key, 0) + 1
    # poisoned keys stay poisoned for the daemon id's lifetime (the image never changes)
    counts.update({k: n for k, n in old.items() if n >= limit})
    tmp = counts_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(counts, f)
    os.replace(tmp, counts_path)
    journal.clear()
    poisoned: set[tuple[str, int]] = set()
    suspects: set[tuple[str, int]] = set()
    for key, n in counts.items():
        name, _, number = key.partition(":")
        if number.isdigit():
            (poisoned if n >= limit else suspects).add((name, int(number)))
    if counts:
        log.warning("requests in flight at the last death(s), with counts: %s; answered EIO from now on: %s; "
                    "run one at a time: %s", counts, sorted(poisoned), sorted(suspects))  # fmt: skip
    return poisoned, suspects


def acquit(counts_path: str, op: str, ino: int) -> None:
    """A suspect ran alone and completed: reset its count, so a later death starts it from zero.

    Without this a request that is in flight at every death (a file read in a loop) piles up
    counts across deaths it did not cause and is poisoned at the third one.
    """
    key = f"{op}:{ino}"
    try:
        with open(counts_path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(doc, dict) or key not in doc:
        return
    del doc[key]
    tmp = counts_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, counts_path)
