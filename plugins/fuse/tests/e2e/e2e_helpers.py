"""The end-to-end stack (containerd with CRI + our snapshotter + nydusd-py) and measurement records."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from nydus_core.testing.services import (
    Containerd,
    CriSettings,
    NydusSnapshotter,
    ServiceError,
    live_pids_mentioning,
    unmount_below,
)

NYDUSD_PY = str(Path(sys.executable).with_name("nydusd-py"))

#: Lazy loading only: with prefetch on, the daemon would pull whole blobs in the background and
#: the byte count would measure prefetch, not what the container needed.
NYDUSD_TEMPLATE: dict[str, Any] = {
    "device": {
        "backend": {"type": "registry",
                    "config": {"scheme": "http", "timeout": 10, "connect_timeout": 5, "retry_limit": 2}},
        "cache": {"type": "blobcache", "config": {"work_dir": ""}},
    },
    "mode": "direct",
    "digest_validate": False,
    "enable_xattr": True,
    "amplify_io": 0,  # no read amplification: count what the container itself needed
    "fs_prefetch": {"enable": False},
}

MEASUREMENTS: list[dict[str, Any]] = []
BUILD: dict[str, Any] = {}
#: What the failover tests saw (one line each in pytest's terminal summary).
FAILOVER: list[str] = []


def record_measurement(doc: dict[str, Any], out_dir: Path) -> Path:
    """Keep `doc` for the terminal summary and write it as JSON into `out_dir`."""
    MEASUREMENTS.append(doc)
    path = out_dir / "lazy-pull.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


class E2EStack:
    """containerd (CRI on, snapshot annotations on unless told) + our snapshotter in one `daemon_mode`."""

    def __init__(self, workdir: Path, mode: str, plain_http: tuple[str, ...],
                 snapshot_annotations: bool = True, amplify_io: int | None = None,
                 recover_policy: str | None = None, env: dict[str, str] | None = None,
                 config_extra: str = "") -> None:
        """`recover_policy` becomes ``--recover-policy``; `env`, `config_extra` go to `NydusSnapshotter`."""
        self.workdir = workdir
        self.mode = mode
        sock = workdir / "nydus" / "nydus.sock"
        template = workdir / "nydusd-config.json"
        workdir.mkdir(parents=True, exist_ok=True)
        self.nydusd_config = dict(NYDUSD_TEMPLATE)
        if amplify_io is not None:
            self.nydusd_config["amplify_io"] = amplify_io
        template.write_text(json.dumps(self.nydusd_config, indent=2))
        policy = ["--recover-policy", recover_policy] if recover_policy else []
        self.snapshotter = NydusSnapshotter(
            workdir / "nydus", sock,
            extra_args=["--daemon-mode", mode, "--nydusd-path", NYDUSD_PY, "--nydusd-config", str(template),
                        *policy],
            env=env, config_extra=config_extra,
        )
        self.containerd = Containerd(
            workdir / "containerd", {"nydus": sock},
            cri=CriSettings(disable_snapshot_annotations=not snapshot_annotations,
                            plain_http_registries=plain_http),
        )

    def start(self) -> None:
        self.snapshotter.start()
        self.containerd.start()

    def daemons(self) -> list[dict[str, Any]]:
        """``GET /api/v1/daemons`` from the snapshotter's system controller."""
        result: list[dict[str, Any]] = self.snapshotter.system_get("/api/v1/daemons")
        return result

    def stop(self) -> None:
        """containerd first (its containers read through the daemons), then the daemons, then us.

        The snapshotter leaves its daemons (and under ``failover`` its session holder) running on
        purpose (a restart re-adopts them), so the test stops them itself: daemon pids from the
        system API, then the holder.
        """
        try:
            self.containerd.stop()
        finally:
            pids: set[int] = set()
            with contextlib.suppress(OSError, ServiceError, ValueError):
                pids = {int(d["pid"]) for d in self.daemons() if d.get("pid")}
            self.snapshotter.stop()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
                time.sleep(0.1)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.snapshotter.purge()  # under failover (it outlives us on purpose)
            for pid in live_pids_mentioning(str(self.workdir)):  # e.g. a warm standby daemon
                print(f"teardown: killing leftover process {pid} of {self.workdir}", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            unmount_below(self.workdir)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


