"""nydus.db: records survive a reopen, instances keep their seq order, deletes cascade."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.control.daemons.store import DaemonStore, daemon_to_doc


def record(tmp_path: Path, did: str, mode: DaemonMode = DaemonMode.SHARED) -> DaemonRecord:
    return DaemonRecord(
        id=did, fs_driver="fusedev", mode=mode, api_socket=tmp_path / "socket" / did / "api.sock",
        mountpoint=tmp_path / "mnt", config_dir=tmp_path / "config" / did, log_dir=tmp_path / "logs" / did,
        program="nydusd", pid=42, thread_num=4, version="v2", backend_data={"socket_of_mine": "/x"},
    )  # fmt: skip


def instance(tmp_path: Path, sid: str, did: str) -> Instance:
    return Instance(
        snapshot_id=sid, daemon_id=did, image_ref="docker.io/library/busybox:latest",
        bootstrap=tmp_path / "snapshots" / sid / "fs" / "image" / "image.boot",
        mountpoint=tmp_path / "mnt" / sid, snapshot_dir=tmp_path / "snapshots" / sid,
        config_path=tmp_path / "config" / did / sid / "config.json",
        annotations={"fscache.id": "abc"}, backend_data={"device": "/dev/loop3", "n": 2},
    )  # fmt: skip


def test_records_round_trip_across_reopen(tmp_path: Path) -> None:
    db = DaemonStore(tmp_path / "nydus.db")
    d = record(tmp_path, "d1")
    db.save_daemon(d)
    i = db.add_instance(instance(tmp_path, "9", "d1"))
    db.close()
    db2 = DaemonStore(tmp_path / "nydus.db")
    assert db2.list_daemons() == [d]
    assert db2.get_instance("9") == i
    assert (tmp_path / "nydus.db").stat().st_mode & 0o777 == 0o600
    mode = sqlite3.connect(str(tmp_path / "nydus.db")).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_instance_seq_orders_and_is_never_reused(tmp_path: Path) -> None:
    db = DaemonStore(tmp_path / "nydus.db")
    db.save_daemon(record(tmp_path, "d1"))
    seqs = [db.add_instance(instance(tmp_path, sid, "d1")).seq for sid in ("30", "10", "20")]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert [i.snapshot_id for i in db.list_instances("d1")] == ["30", "10", "20"]
    db.delete_instance("20")
    assert db.add_instance(instance(tmp_path, "40", "d1")).seq > seqs[-1]
    # re-saving an instance keeps its seq
    again = db.get_instance("30")
    assert again is not None
    assert db.add_instance(again).seq == seqs[0]


def test_delete_daemon_drops_its_instances(tmp_path: Path) -> None:
    db = DaemonStore(tmp_path / "nydus.db")
    db.save_daemon(record(tmp_path, "d1", DaemonMode.DEDICATED))
    db.save_daemon(record(tmp_path, "d2", DaemonMode.DEDICATED))
    db.add_instance(instance(tmp_path, "1", "d1"))
    db.add_instance(instance(tmp_path, "2", "d2"))
    db.delete_daemon("d1")
    assert [d.id for d in db.list_daemons()] == ["d2"]
    assert [i.snapshot_id for i in db.list_instances()] == ["2"]
    assert db.get_daemon("d1") is None and db.get_instance("1") is None


def test_backend_data_persists_and_old_top_level_facts_move_into_it(tmp_path: Path) -> None:
    """A record of an earlier release kept a backend's fact (the fusedev supervisor socket) at the
    top of the document: it reaches the backend in ``backend_data``, and nothing is dropped."""
    import json

    db = DaemonStore(tmp_path / "nydus.db")
    d = record(tmp_path, "d1")
    db.save_daemon(d)
    assert db.get_daemon("d1") == d  # backend_data round-trips as is
    old = {k: v for k, v in daemon_to_doc(d).items() if k != "backend_data"}
    old["supervisor_path"] = "/root/supervisor/d1.sock"
    with sqlite3.connect(str(tmp_path / "nydus.db")) as raw:
        raw.execute("UPDATE daemons SET doc = ? WHERE id = 'd1'", (json.dumps(old),))
    migrated = DaemonStore(tmp_path / "nydus.db").get_daemon("d1")
    assert migrated is not None
    assert migrated.backend_data == {"supervisor_path": "/root/supervisor/d1.sock"}
    assert migrated.pid == d.pid and migrated.api_socket == d.api_socket
