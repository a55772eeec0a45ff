"""Reads run on pooled connections: they see every committed write and do not leak files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from nydus_core.control.snapshot import metastore
from nydus_core.control.snapshot.metastore import MetaStore
from nydus_core.control.snapshot.model import Kind


def _open_db_files(db: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(db):
                count += 1
        except OSError:
            continue
    return count


def test_short_lived_reader_threads_do_not_pile_up_connections(short_tmp: Path) -> None:
    # A system API serving each request on a new thread must not leave one connection per thread.
    db = short_tmp / "meta.db"
    ms = MetaStore(db)
    seen: list[str] = []
    for i in range(3 * metastore.MAX_IDLE_READERS):
        ms.create(Kind.ACTIVE, f"k{i}", "", {})
        # A fresh thread reads what was just committed (no stale snapshot in a pooled connection)
        t = threading.Thread(target=lambda i=i: seen.append(ms.get(f"k{i}").info.name))
        t.start()
        t.join()
    assert seen == [f"k{i}" for i in range(3 * metastore.MAX_IDLE_READERS)]
    assert _open_db_files(db) <= 1 + metastore.MAX_IDLE_READERS
    ms.close()
    assert _open_db_files(db) == 0
