"""Group commit in the metastore: concurrent writes share one COMMIT, yet each stays atomic.

The writers are lined up deterministically: the test holds the writer lock, starts them, waits
until all are queued on it and lets go; the first then finds the others waiting and leaves the
transaction open for them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from nydus_core.control.snapshot import metastore
from nydus_core.control.snapshot.metastore import MetaStore
from nydus_core.control.snapshot.model import Kind, Snapshot
from nydus_core.errors import AlreadyExists


class CountingStore(MetaStore):
    """A MetaStore that counts the COMMITs that carried writes."""

    commits = 0

    def _commit_batch(self) -> None:
        if self._batch is not None:
            self.commits += 1
        super()._commit_batch()


def _queue_writers(ms: MetaStore, jobs: list[threading.Thread]) -> None:
    with ms._lock:
        for job in jobs:
            job.start()
        deadline = time.monotonic() + 10
        while ms._waiting < len(jobs):
            assert time.monotonic() < deadline, "writers never queued on the lock"
            time.sleep(0.005)
    for job in jobs:
        job.join(10)
        assert not job.is_alive()


def test_batched_writes_share_a_commit_and_fail_alone(short_tmp: Path) -> None:
    db = short_tmp / "meta.db"
    ms = CountingStore(db)
    ms.create(Kind.ACTIVE, "taken", "", {})
    before = ms.commits
    results: dict[str, BaseException | None] = {}

    def boom(snap: Snapshot) -> None:
        raise OSError("rename failed")

    def write(key: str) -> None:
        try:
            ms.create(Kind.ACTIVE, key, "", {"k": key}, before_commit=boom if key == "bad" else None)
            results[key] = None
        except BaseException as exc:
            results[key] = exc

    keys = [f"ok{i}" for i in range(6)] + ["taken", "bad"]
    _queue_writers(ms, [threading.Thread(target=write, args=(k,)) for k in keys])

    assert ms.commits - before < len(keys), "no two writes shared a COMMIT"
    assert isinstance(results["taken"], AlreadyExists)
    assert isinstance(results["bad"], OSError)
    assert all(results[f"ok{i}"] is None for i in range(6))
    ms.close()
    # What a fresh process sees: exactly the successful writes, each complete
    again = MetaStore(db)
    names = sorted(i.name for i in again.walk())
    assert names == sorted(["taken"] + [f"ok{i}" for i in range(6)])
    assert again.get("ok3").info.labels == {"k": "ok3"}
    again.close()


def test_a_failed_commit_fails_every_write_of_the_batch(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = MetaStore(short_tmp / "meta.db")
    errors: list[BaseException] = []

    def write(key: str) -> None:
        try:
            ms.create(Kind.ACTIVE, key, "", {})
        except BaseException as exc:
            errors.append(exc)

    # Make the COMMIT itself fail (a disk error is hard to arrange): the writer connection is
    # wrapped so that COMMIT raises, as sqlite does on an I/O error; everything else is real.
    class Refusing:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT":
                raise metastore.sqlite3.OperationalError("disk I/O error")
            return self.inner.execute(sql, *args)  # type: ignore[attr-defined]

        def cursor(self) -> object:
            return self.inner.cursor()  # type: ignore[attr-defined]

    real_db = ms._db
    monkeypatch.setattr(ms, "_db", Refusing(real_db))
    keys = [f"k{i}" for i in range(4)]
    _queue_writers(ms, [threading.Thread(target=write, args=(k,)) for k in keys])
    monkeypatch.setattr(ms, "_db", real_db)

    assert len(errors) == len(keys)
    assert all(isinstance(e, metastore.sqlite3.OperationalError) for e in errors)
    assert ms.walk() == []
    ms.close()
