"""Fixtures for daemon-manager tests: a short throw-away root, the mini nydusd, images, events.

Every process a test starts is found again by its command line (it names the test root) and
killed at teardown, and every mount under the root is unmounted, so a failing test leaves no
daemon or mount behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest

from nydus_core.config import DaemonConfig, SnapshotterConfig
from nydus_core.daemon.model import DaemonRecord
from nydus_core.daemon.mounts import umount_tree
from nydus_core.hookspecs import hookimpl
from nydus_core.plugins import build_plugin_manager
from nydus_core.snapshot import labels as L
from nydus_core.snapshot.model import ImageSource

MINI_NYDUSD = Path(__file__).with_name("mini_nydusd.py")


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (our test root: only what we started)."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.fixture
def root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (real mounts)")
    # Short on purpose: <root>/socket/<20-char id>/api.sock must fit a unix socket path.
    path = Path(tempfile.mkdtemp(prefix="nydt-", dir="/tmp"))
    yield path
    for pid in pids_mentioning(str(path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids_mentioning(str(path))) and time.monotonic() < deadline:
        time.sleep(0.05)
    umount_tree(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nydusd_program(root: Path) -> Path:
    """An executable that runs the mini nydusd with this interpreter (for ``[daemon] nydusd_path``)."""
    wrapper = root / "bin" / "mini-nydusd"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {MINI_NYDUSD} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


@pytest.fixture
def make_config(root: Path, nydusd_program: Path) -> Callable[..., SnapshotterConfig]:
    def make(
        daemon_mode: str = "dedicated", recover_policy: str = "restart", fs_driver: str = "fusedev"
    ) -> SnapshotterConfig:
        return SnapshotterConfig(
            root=root,
            daemon_mode=daemon_mode,
            daemon=DaemonConfig(
                nydusd_path=str(nydusd_program),
                nydusd_config=root / "no-such-template.json",
                recover_policy=recover_policy,
                fs_driver=fs_driver,
            ),
        )

    return make


class EventRecorder:
    """A plugin that records every `nydus_daemon_event` as (daemon id, event, detail)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    @hookimpl
    def nydus_daemon_event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        self.events.append((daemon.id, event, dict(detail)))

    def names(self, daemon_id: str | None = None) -> list[str]:
        return [e for d, e, _ in self.events if daemon_id is None or d == daemon_id]


@pytest.fixture
def events() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def pm(events: EventRecorder) -> pluggy.PluginManager:
    return build_plugin_manager([events], entry_points=False, env={})


@pytest.fixture(autouse=True)
def _isolated_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture
def make_image(root: Path) -> Callable[..., ImageSource]:
    """A committed meta snapshot dir with a bootstrap the mini nydusd understands."""

    def make(
        meta_id: str,
        files: Mapping[str, str] | None = None,
        ref: str = "docker.io/library/busybox:latest",
        labels: Mapping[str, str] | None = None,
    ) -> ImageSource:
        upper = root / "snapshots" / meta_id / "fs"
        boot = upper / "image" / "image.boot"
        boot.parent.mkdir(parents=True)
        boot.write_text(json.dumps({"files": dict(files or {"hello.txt": f"image {meta_id}\n"})}))
        all_labels = {L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: ref, **(labels or {})}
        return ImageSource(format="nydus", meta_id=meta_id, bootstrap=boot, image_ref=ref, labels=all_labels)

    return make
