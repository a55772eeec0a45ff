"""Persistence of daemon records and RAFS instances in ``<root>/nydus.db`` (sqlite, WAL).

Upstream keeps the same facts in a bbolt file (buckets ``daemons`` and ``instances``); a
restarted snapshotter reads them back to re-adopt live daemons and respawn dead ones. Instances
carry a ``seq`` so that a respawned shared daemon gets its images back in the original order.
Records are stored as JSON documents so that a compatible extension of the attrs models does not
need a schema migration.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS daemons (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    snapshot_id TEXT PRIMARY KEY,
    daemon_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_daemon ON instances (daemon_id);
"""


def daemon_to_doc(d: DaemonRecord) -> dict[str, Any]:
    return {
        "id": d.id,
        "fs_driver": d.fs_driver,
        "mode": d.mode.value,
        "api_socket": str(d.api_socket),
        "mountpoint": str(d.mountpoint),
        "config_dir": str(d.config_dir),
        "log_dir": str(d.log_dir),
        "program": d.program,
        "pid": d.pid,
        "thread_num": d.thread_num,
        "log_level": d.log_level,
        "failover_policy": d.failover_policy,
        "version": d.version,
        "backend_data": dict(d.backend_data),
    }


_DAEMON_FIELDS = frozenset(
    ("id", "fs_driver", "mode", "api_socket", "mountpoint", "config_dir", "log_dir", "program", "pid",
     "thread_num", "log_level", "failover_policy", "version", "backend_data")
)


def _backend_data(doc: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """The document's ``backend_data``, plus top-level keys this version does not know: a record
    written by an older release that kept a backend's fact at the top (``supervisor_path``) is
    handed to the backend unchanged, never dropped."""
    data = dict(doc.get("backend_data") or {})
    for key, value in doc.items():
        if key not in known and value is not None:
            data.setdefault(key, value)
    return data


def daemon_from_doc(doc: dict[str, Any]) -> DaemonRecord:
    return DaemonRecord(
        id=doc["id"],
        fs_driver=doc["fs_driver"],
        mode=DaemonMode(doc["mode"]),
        api_socket=Path(doc["api_socket"]),
        mountpoint=Path(doc["mountpoint"]),
        config_dir=Path(doc["config_dir"]),
        log_dir=Path(doc["log_dir"]),
        program=doc.get("program", ""),
        pid=int(doc.get("pid", 0)),
        thread_num=int(doc.get("thread_num", 0)),
        log_level=doc.get("log_level", "info"),
        failover_policy=doc.get("failover_policy", "resend"),
        version=doc.get("version", ""),
        backend_data=_backend_data(doc, _DAEMON_FIELDS),
    )


def instance_to_doc(i: Instance) -> dict[str, Any]:
    return {
        "snapshot_id": i.snapshot_id,
        "daemon_id": i.daemon_id,
        "image_ref": i.image_ref,
        "bootstrap": str(i.bootstrap),
        "mountpoint": str(i.mountpoint),
        "snapshot_dir": str(i.snapshot_dir),
        "fs_driver": i.fs_driver,
        "config_path": None if i.config_path is None else str(i.config_path),
        "seq": i.seq,
        "annotations": dict(i.annotations),
        "backend_data": dict(i.backend_data),
    }


_INSTANCE_FIELDS = frozenset(
    ("snapshot_id", "daemon_id", "image_ref", "bootstrap", "mountpoint", "snapshot_dir", "fs_driver",
     "config_path", "seq", "annotations", "backend_data")
)


def instance_from_doc(doc: dict[str, Any]) -> Instance:
    cp = doc.get("config_path")
    return Instance(
        snapshot_id=doc["snapshot_id"],
        daemon_id=doc["daemon_id"],
        image_ref=doc.get("image_ref", ""),
        bootstrap=Path(doc["bootstrap"]),
        mountpoint=Path(doc["mountpoint"]),
        snapshot_dir=Path(doc["snapshot_dir"]),
        fs_driver=doc.get("fs_driver", ""),
        config_path=None if cp is None else Path(cp),
        seq=int(doc.get("seq", 0)),
        annotations=dict(doc.get("annotations", {})),
        backend_data=_backend_data(doc, _INSTANCE_FIELDS),
    )


class DaemonStore:
    """Thread-safe access to ``nydus.db``; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Daemon and instance records are written rarely; losing one strands a live mount.
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SCHEMA)
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('version', ?)", (str(SCHEMA_VERSION),)
            )
        path.chmod(0o600)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # daemons -------------------------------------------------------------------------------

    def save_daemon(self, d: DaemonRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO daemons (id, doc) VALUES (?, ?)", (d.id, json.dumps(daemon_to_doc(d)))
            )

    def get_daemon(self, daemon_id: str) -> DaemonRecord | None:
        with self._tx() as db:
            row = db.execute("SELECT doc FROM daemons WHERE id = ?", (daemon_id,)).fetchone()
        return None if row is None else daemon_from_doc(json.loads(row[0]))

    def list_daemons(self) -> list[DaemonRecord]:
        with self._tx() as db:
            rows = db.execute("SELECT doc FROM daemons ORDER BY id").fetchall()
        return [daemon_from_doc(json.loads(r[0])) for r in rows]

    def delete_daemon(self, daemon_id: str) -> None:
        """Forget a daemon and every instance recorded on it."""
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE daemon_id = ?", (daemon_id,))
            db.execute("DELETE FROM daemons WHERE id = ?", (daemon_id,))

    # instances -----------------------------------------------------------------------------

    def add_instance(self, inst: Instance) -> Instance:
        """Record an instance, giving it the next ``seq`` when it has none yet; returns it."""
        with self._tx() as db:
            if inst.seq <= 0:
                # A persisted counter, so a seq is never reused even after instances are removed.
                high = db.execute("SELECT COALESCE(MAX(seq), 0) FROM instances").fetchone()[0]
                row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
                inst.seq = max(int(row[0]) if row else 1, int(high) + 1)
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (str(inst.seq + 1),)
                )
            db.execute(
                "INSERT OR REPLACE INTO instances (snapshot_id, daemon_id, seq, doc) VALUES (?, ?, ?, ?)",
                (inst.snapshot_id, inst.daemon_id, inst.seq, json.dumps(instance_to_doc(inst))),
            )
        return inst

    def get_instance(self, snapshot_id: str) -> Instance | None:
        with self._tx() as db:
            row = db.execute("SELECT doc FROM instances WHERE snapshot_id = ?", (snapshot_id,)).fetchone()
        return None if row is None else instance_from_doc(json.loads(row[0]))

    def list_instances(self, daemon_id: str | None = None) -> list[Instance]:
        """Instances in ``seq`` order (the order they must be re-attached in)."""
        with self._tx() as db:
            if daemon_id is None:
                rows = db.execute("SELECT doc FROM instances ORDER BY seq").fetchall()
            else:
                rows = db.execute(
                    "SELECT doc FROM instances WHERE daemon_id = ? ORDER BY seq", (daemon_id,)
                ).fetchall()
        return [instance_from_doc(json.loads(r[0])) for r in rows]

    def delete_instance(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE snapshot_id = ?", (snapshot_id,))
