"""A containerd 1.6 + ``containerd-nydus-grpc --enable-stargz`` + nydusd-py stack for one test."""

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
    PLAIN_HTTP_NYDUSD_TEMPLATE,
    Containerd,
    CriSettings,
    NydusSnapshotter,
    ServiceError,
    live_pids_mentioning,
    unmount_below,
)

NYDUSD_PY = str(Path(sys.executable).with_name("nydusd-py"))

#: Lazy reads only, no read amplification: what the registry serves is what the container read.
NYDUSD_TEMPLATE: dict[str, Any] = {**PLAIN_HTTP_NYDUSD_TEMPLATE, "amplify_io": 0}


class StargzStack:
    def __init__(
        self,
        workdir: Path,
        plain_http: tuple[str, ...],
        template: dict[str, Any] | None = None,
        mode: str = "dedicated",
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        tpl = workdir / "nydusd-config.json"
        tpl.write_text(json.dumps(template or NYDUSD_TEMPLATE, indent=2))
        sock = workdir / "nydus" / "nydus.sock"
        self.snapshotter = NydusSnapshotter(
            workdir / "nydus",
            sock,
            extra_args=[
                "--daemon-mode",
                mode,
                "--nydusd-path",
                NYDUSD_PY,
                "--nydusd-config",
                str(tpl),
                "--enable-stargz",
            ],
        )
        self.containerd = Containerd(
            workdir / "containerd", {"nydus": sock}, cri=CriSettings(plain_http_registries=plain_http)
        )

    def start(self) -> None:
        self.snapshotter.start()
        self.containerd.start()

    def log(self) -> str:
        return self.snapshotter.log_path.read_text(errors="replace")

    def log_tail(self, n: int) -> str:
        return self.log()[-n:]

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            pids: set[int] = set()
            with contextlib.suppress(OSError, ServiceError, ValueError):
                pids = {int(d["pid"]) for d in self.snapshotter.system_get("/api/v1/daemons") if d.get("pid")}
            self.snapshotter.stop()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline:
                pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
                time.sleep(0.1)
            self.snapshotter.purge()
            for pid in live_pids_mentioning(str(self.workdir)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            unmount_below(self.workdir)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
