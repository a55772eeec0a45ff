"""The snapshot metastore: containerd's bolt storage semantics on top of sqlite.

Why sqlite and not a bolt clone: we only need what `snapshots/storage/bolt.go` guarantees, and
sqlite gives it cheaply: atomic transactions, a never-reused id sequence (AUTOINCREMENT) and
crash safety (WAL). The semantics that containerd users depend on are kept exactly:

* every snapshot has a numeric id from a sequence that never goes back, shown in decimal; the
  directory ``snapshots/<id>`` is named after it and the id survives ``Commit``;
* ``Commit`` renames the active key to the committed name, *replaces* the labels, stores the
  usage and resets both timestamps to the commit time (as bolt does);
* only committed snapshots can be parents; a snapshot with children cannot be removed;
* parent ids are reported nearest first (the overlay ``lowerdir`` order);
* errors carry the gRPC code containerd branches on (`nydus_core.errors`).

Thread safety: writes go through one connection guarded by one lock. Each write is one short
transaction, so a lock costs less than sqlite's busy-retry sleeping would; ``busy_timeout`` still
covers another process (a debugging tool) reading the file. Reads (Stat, Mounts, List, ...) use
pooled read-only connections instead: in WAL mode a reader sees the last committed state without
waiting for a writer, so a Mounts call never queues behind another client's fsync.

Group commit: while one write fsyncs, others queue on the lock. A write that finds more writers
waiting leaves the sqlite transaction open and waits; the last one of the queue COMMITs for all
(one fsync). Each operation still runs in its own SAVEPOINT, so it is applied entirely or not at
all, and nobody returns before the COMMIT holding its changes is on disk: a caller never hears
"done" for something a crash could still lose. If that COMMIT fails, every operation of the
batch fails.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

from nydus_core.control.snapshot.model import Info, Kind, Snapshot, Usage
from nydus_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT    NOT NULL UNIQUE,
    kind      INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    labels    TEXT    NOT NULL DEFAULT '{}',
    created   INTEGER NOT NULL,
    updated   INTEGER NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,
    inodes    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

_INFO_SELECT = (
    "SELECT s.id, s.key, s.kind, COALESCE(p.key, ''), s.labels, s.created, s.updated, s.size, s.inodes "
    "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)

_CHAIN_SQL = """
WITH RECURSIVE chain(id, depth) AS (
    SELECT ?, 0
    UNION ALL
    SELECT s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.id
    WHERE s.parent_id IS NOT NULL
)
SELECT s.id, s.key, s.labels FROM chain c JOIN snapshots s ON s.id = c.id ORDER BY c.depth
"""


@attrs.frozen
class ChainLink:
    """One committed ancestor: its id, name and labels (nearest parent first in lists)."""

    id: str
    name: str
    labels: dict[str, str]


@attrs.frozen
class Record:
    """A full row: the storage id, what containerd sees (`Info`) and the stored usage."""

    id: str
    info: Info
    usage: Usage


def _now() -> int:
    return time.time_ns()


def _row_to_record(row: Sequence[object]) -> Record:
    sid, key, kind, parent, labels, created, updated, size, inodes = row
    info = Info(
        name=str(key),
        kind=Kind(int(kind)),  # type: ignore[call-overload]
        parent=str(parent),
        labels=json.loads(str(labels)),
        created_at=int(created),  # type: ignore[call-overload]
        updated_at=int(updated),  # type: ignore[call-overload]
    )
    return Record(str(sid), info, Usage(int(size), int(inodes)))  # type: ignore[call-overload]


def _dump_labels(labels: dict[str, str] | None) -> str:
    return json.dumps(labels or {}, sort_keys=True, separators=(",", ":"))


#: Idle read connections kept open (more concurrent readers open and close their own).
MAX_IDLE_READERS = 16

#: Writes sharing one COMMIT at most (bounds how long the first of them waits).
MAX_BATCH = 32


class _Batch:
    """Writes applied in the open sqlite transaction, waiting for the COMMIT that makes them durable."""

    def __init__(self) -> None:
        self.size = 0
        self.done = threading.Event()
        self.error: BaseException | None = None


class MetaStore:
    """Snapshot records in ``<root>/metadata.db``; each public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._batch: _Batch | None = None
        self._waiting = 0  # writers blocked on `_lock` (guarded by `_count_lock`)
        self._count_lock = threading.Lock()
        self._owner: int | None = None  # thread inside a write (nested writes skip batching)
        self._idle_readers: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: every committed transaction is on disk before containerd hears "done", as with
        # containerd's own bolt store. NORMAL would survive a kill -9 but a power cut could drop
        # records containerd already holds, which is upstream's "missing parent" failure.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._tx(write=True) as cur:
            version = cur.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{path}: unknown metastore schema version {version}")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    cur.execute(stmt)
            cur.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._commit_batch()
            with self._pool_lock:
                self._closed = True
                idle, self._idle_readers = self._idle_readers, []
            for conn in idle:  # connections in use are closed when given back
                conn.close()
            self._db.close()

    def _take_reader(self) -> sqlite3.Connection:
        """An idle read-only connection, or a new one (the pool grows to the read concurrency)."""
        with self._pool_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            if self._idle_readers:
                return self._idle_readers.pop()
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA query_only=ON")
        return conn

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._pool_lock:
            if not self._closed and len(self._idle_readers) < MAX_IDLE_READERS:
                self._idle_readers.append(conn)
                return
        conn.close()

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Cursor]:
        """One transaction: committed on success, rolled back on any exception.

        Writes hold the writer lock; reads run on a pooled connection, as one consistent WAL
        snapshot, without waiting for writers.
        """
        if not write:
            conn = self._take_reader()
            try:
                cur = conn.cursor()
                cur.execute("BEGIN")
                try:
                    yield cur
                finally:
                    cur.execute("COMMIT")
                    cur.close()
            finally:
                self._give_back(conn)
            return
        if self._owner == threading.get_ident():  # nested write: part of the outer one
            with self._lock:
                yield self._db.cursor()
            return
        with self._count_lock:
            self._waiting += 1
        self._lock.acquire()
        with self._count_lock:
            self._waiting -= 1
        failed: BaseException | None = None
        try:
            self._owner = threading.get_ident()
            batch = self._batch
            if batch is None:
                self._db.execute("BEGIN IMMEDIATE")
                batch = self._batch = _Batch()
            batch.size += 1
            cur = self._db.cursor()
            cur.execute("SAVEPOINT op")
            try:
                yield cur
            except BaseException as exc:
                cur.execute("ROLLBACK TO op")
                failed = exc
            finally:
                cur.execute("RELEASE op")
                cur.close()
            with self._count_lock:
                others = self._waiting
            lead = not others or batch.size >= MAX_BATCH
            if lead:
                self._commit_batch()
        finally:
            self._owner = None
            self._lock.release()
        if not lead:
            batch.done.wait()
        if failed is not None:
            raise failed
        if batch.error is not None:
            raise sqlite3.OperationalError(f"commit failed: {batch.error}") from batch.error

    def _commit_batch(self) -> None:
        """COMMIT the open batch (under `_lock`) and wake its writers; a failure fails them all."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._db.execute("COMMIT")
        except BaseException as exc:
            batch.error = exc
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        finally:
            batch.done.set()

    # ---------------------------------------------------------------- helpers (inside a tx)

    @staticmethod
    def _row(cur: sqlite3.Cursor, key: str) -> tuple[int, int, int | None] | None:
        row = cur.execute("SELECT id, kind, parent_id FROM snapshots WHERE key = ?", (key,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), row[2])

    @staticmethod
    def _parent_ids(cur: sqlite3.Cursor, parent_id: int | None) -> tuple[str, ...]:
        if parent_id is None:
            return ()
        return tuple(str(r[0]) for r in cur.execute(_CHAIN_SQL, (parent_id,)))

    # ---------------------------------------------------------------- operations

    def create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: dict[str, str] | None,
        before_commit: Callable[[Snapshot], None] | None = None,
        chain_out: list[ChainLink] | None = None,
    ) -> Snapshot:
        """Insert an Active or View snapshot.

        `before_commit` runs inside the open transaction with the new snapshot (the snapshotter
        renames its prepared directory there); if it raises, nothing is recorded. `chain_out`,
        when given, receives the committed ancestors (as `chain` would return them) read in the
        same transaction, which spares Prepare a second one.
        """
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {kind.name} invalid; only snapshots of type Active or View can be created"
            )
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        with self._tx(write=True) as cur:
            parent_id: int | None = None
            if parent:
                prow = self._row(cur, parent)
                if prow is None:
                    raise NotFound(f'missing parent "{parent}" bucket: not found')
                if prow[1] != Kind.COMMITTED:
                    raise InvalidArgument(f'parent "{parent}" is not committed snapshot')
                parent_id = prow[0]
            if self._row(cur, key) is not None:
                raise AlreadyExists(f"snapshot {key}: already exists")
            now = _now()
            cur.execute(
                "INSERT INTO snapshots(key, kind, parent_id, labels, created, updated) VALUES (?,?,?,?,?,?)",
                (key, int(kind), parent_id, _dump_labels(labels), now, now),
            )
            sid = cur.lastrowid
            links: list[ChainLink] = []
            if parent_id is not None:
                rows = cur.execute(_CHAIN_SQL, (parent_id,)).fetchall()
                links = [ChainLink(str(r[0]), str(r[1]), json.loads(r[2])) for r in rows]
            snap = Snapshot(id=str(sid), kind=kind, parent_ids=tuple(link.id for link in links))
            if before_commit is not None:
                before_commit(snap)
            if chain_out is not None:
                chain_out[:] = links
            return snap

    def get(self, key: str) -> Record:
        """Stat: the record of any kind."""
        with self._tx() as cur:
            row = cur.execute(_INFO_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key}: not found")
        return _row_to_record(row)

    def get_snapshot(self, key: str) -> Snapshot:
        """The id and parent chain of an Active or View snapshot (what Mounts needs).

        Like containerd 1.6, asking for a committed snapshot is a failed precondition.
        """
        with self._tx() as cur:
            row = self._row(cur, key)
            if row is None:
                raise NotFound(f"snapshot {key}: not found")
            sid, kind, parent_id = row
            if kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"requested snapshot {key} not active or view")
            return Snapshot(id=str(sid), kind=Kind(kind), parent_ids=self._parent_ids(cur, parent_id))

    def resolve(self, key: str) -> tuple[Snapshot, dict[str, str], list[ChainLink]]:
        """Everything Mounts needs in one transaction: the Active/View snapshot, its labels and
        its committed ancestors (nearest first). A committed `key` is a failed precondition."""
        with self._tx() as cur:
            row = cur.execute(
                "SELECT id, kind, parent_id, labels FROM snapshots WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key}: not found")
            sid, kind, parent_id, labels = row
            if kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"requested snapshot {key} not active or view")
            links: list[ChainLink] = []
            if parent_id is not None:
                rows = cur.execute(_CHAIN_SQL, (parent_id,)).fetchall()
                links = [ChainLink(str(r[0]), str(r[1]), json.loads(r[2])) for r in rows]
        snap = Snapshot(id=str(sid), kind=Kind(kind), parent_ids=tuple(link.id for link in links))
        return snap, json.loads(labels), links

    def chain(self, key: str) -> list[ChainLink]:
        """The committed ancestors of `key`, nearest parent first (empty without a parent)."""
        with self._tx() as cur:
            row = cur.execute("SELECT parent_id FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key}: not found")
            if row[0] is None:
                return []
            rows = cur.execute(_CHAIN_SQL, (row[0],)).fetchall()
            return [ChainLink(str(r[0]), str(r[1]), json.loads(r[2])) for r in rows]

    def commit(self, key: str, name: str, usage: Usage, labels: dict[str, str] | None) -> Record:
        """Turn the Active `key` into the Committed `name`, keeping its id."""
        if not name:
            raise InvalidArgument(f"snapshot {key}: the committed name must not be empty")
        with self._tx(write=True) as cur:
            if self._row(cur, name) is not None:
                raise AlreadyExists(f"committed snapshot {name}: already exists")
            row = self._row(cur, key)
            if row is None:
                raise NotFound(f'failed to get active snapshot "{key}": not found')
            sid, kind, _ = row
            if kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {name} is not active")
            now = _now()
            cur.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created = ?, updated = ?, "
                "size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), _dump_labels(labels), now, now, usage.size, usage.inodes, sid),
            )
            row2 = cur.execute(_INFO_SELECT + " WHERE s.id = ?", (sid,)).fetchone()
            return _row_to_record(row2)

    def remove(self, key: str, before_commit: Callable[[Record], None] | None = None) -> Record:
        """Delete the record of `key`; refused while another snapshot names it as parent.

        `before_commit` runs inside the transaction with the removed record (the snapshotter
        moves the directory aside there).
        """
        with self._tx(write=True) as cur:
            row = cur.execute(_INFO_SELECT + " WHERE s.key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key}: not found")
            rec = _row_to_record(row)
            child = cur.execute(
                "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (int(rec.id),)
            ).fetchone()
            if child is not None:
                raise FailedPrecondition(f"cannot remove snapshot with child: {key}")
            cur.execute("DELETE FROM snapshots WHERE id = ?", (int(rec.id),))
            if before_commit is not None:
                before_commit(rec)
            return rec

    def update(self, info: Info, paths: Sequence[str]) -> Info:
        """Update the mutable fields (labels only) as the field-mask `paths` say.

        ``labels`` replaces all labels, ``labels.<k>`` sets or (when `info` lacks it) deletes one
        key, an empty mask means every mutable field. ``updated`` moves to now.
        """
        with self._tx(write=True) as cur:
            row = cur.execute(_INFO_SELECT + " WHERE s.key = ?", (info.name,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {info.name}: not found")
            current = _row_to_record(row)
            labels = dict(current.info.labels)
            if paths:
                for path in paths:
                    if path.startswith("labels."):
                        lkey = path[len("labels.") :]
                        if lkey in info.labels:
                            labels[lkey] = info.labels[lkey]
                        else:
                            labels.pop(lkey, None)
                    elif path == "labels":
                        labels = dict(info.labels)
                    else:
                        raise InvalidArgument(f'cannot update "{path}" field on snapshot "{info.name}"')
            else:
                labels = dict(info.labels)
            now = _now()
            cur.execute(
                "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                (_dump_labels(labels), now, int(current.id)),
            )
            return attrs.evolve(current.info, labels=labels, updated_at=now)

    def walk(self, match: Callable[[Info], bool] | None = None) -> list[Info]:
        """Every snapshot's info (sorted by key, like bolt's ForEach), filtered by `match`."""
        with self._tx() as cur:
            rows = cur.execute(_INFO_SELECT + " ORDER BY s.key").fetchall()
        infos = [_row_to_record(r).info for r in rows]
        return infos if match is None else [i for i in infos if match(i)]

    def ids(self) -> set[str]:
        """The ids of every recorded snapshot (what Cleanup keeps)."""
        with self._tx() as cur:
            return {str(r[0]) for r in cur.execute("SELECT id FROM snapshots")}

    def exists_id(self, sid: str) -> bool:
        """Whether a record has id `sid`, asked under the writer lock: Cleanup relies on this
        to wait for a Prepare whose directory is already renamed in but whose transaction has
        not committed yet (a reader connection would not see that record and delete the dir)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM snapshots WHERE id = ?", (int(sid),)).fetchone()
            return row is not None
