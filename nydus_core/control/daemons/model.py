"""Daemon and RAFS instance records, persisted so that a restarted snapshotter finds them again.

The fields are backend-neutral (upstream's ``ConfigState`` and ``Rafs`` names); what only one
backend needs goes in ``backend_data``, a JSON-able dict that backend owns and the store persists.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import attrs


class DaemonMode(enum.StrEnum):
    DEDICATED = "dedicated"
    SHARED = "shared"
    NONE = "none"


@attrs.define
class DaemonRecord:
    """One daemon process (nydusd or compatible) and where its sockets, config and logs live.

    Field meanings follow upstream's `ConfigState`. `fs_driver` names the backend record that
    owns it (`fusedev`, `fscache`, ...); the daemon manager drives it only through that record.
    `backend_data` is the owning backend's (a supervisor socket, a standby, ...), persisted as is.
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
    thread_num: int = 0
    log_level: str = "info"
    failover_policy: str = "resend"
    version: str = ""
    backend_data: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Instance:
    """One image (RAFS instance) served by a backend, through a daemon (`daemon_id`) or without one
    (`daemon_id` empty); keyed by its meta snapshot id. `backend_data` is the backend's."""

    snapshot_id: str
    daemon_id: str
    image_ref: str
    bootstrap: Path
    mountpoint: Path
    snapshot_dir: Path
    fs_driver: str = ""
    config_path: Path | None = None
    seq: int = 0
    annotations: dict[str, str] = attrs.field(factory=dict)
    backend_data: dict[str, Any] = attrs.field(factory=dict)
