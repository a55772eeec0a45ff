"""Daemon and RAFS instance records, persisted so that a restarted snapshotter finds them again."""

from __future__ import annotations

import enum
from pathlib import Path

import attrs


class DaemonMode(enum.StrEnum):
    DEDICATED = "dedicated"
    SHARED = "shared"
    NONE = "none"


@attrs.define
class DaemonRecord:
    """One daemon process (nydusd or compatible) and where its sockets, config and logs live.

    Field meanings follow upstream's `ConfigState`. `fs_driver` names the backend that owns it
    (`fusedev`, `fscache`, ...): lifecycle hook implementations answer only for their own driver.
    """

    id: str
    fs_driver: str
    mode: DaemonMode
    api_socket: Path
    mountpoint: Path
    config_dir: Path
    log_dir: Path
    program: str = ""
    pid: int = 0
    supervisor_path: Path | None = None
    thread_num: int = 0
    log_level: str = "info"
    failover_policy: str = "resend"
    version: str = ""


@attrs.define
class Instance:
    """One image (RAFS instance) mounted by a daemon; keyed by its meta snapshot id."""

    snapshot_id: str
    daemon_id: str
    image_ref: str
    bootstrap: Path
    mountpoint: Path
    snapshot_dir: Path
    fs_driver: str = "fusedev"
    config_path: Path | None = None
    seq: int = 0
    annotations: dict[str, str] = attrs.field(factory=dict)
