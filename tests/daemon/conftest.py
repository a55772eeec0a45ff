"""Fixtures for daemon-manager tests: a short throw-away root, the ``mini`` backend running the
mini nydusd, images, events.

Every process a test starts is found again by its command line (it names the test root) and
killed at teardown, and every mount under the root is unmounted, so a failing test leaves no
daemon or mount behind.
"""

from __future__ import annotations

import contextlib
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

import pytest
from daemon_helpers import MINI, EventRecorder, MiniBackend, pid_alive, pids_mentioning

from nydus_core import labels as L
from nydus_core.config import DaemonConfig, SnapshotterConfig
from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.control.daemons.nydusd import NydusdBackend
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.plugins import NydusPluginManager, build_plugin_manager

MINI_NYDUSD = Path(__file__).with_name("mini_nydusd.py")


@pytest.fixture
def root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (real mounts)")
    # Short on purpose: <root>/socket/<20-char id>/api.sock must fit a unix socket path.
    path = Path(tempfile.mkdtemp(prefix="nydt-", dir="/tmp"))
    yield path
    for pid in pids_mentioning(str(path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
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
        daemon_mode: str = "dedicated", recover_policy: str = "restart", fs_driver: str = MINI
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


@pytest.fixture
def events() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def mini() -> MiniBackend:
    return MiniBackend()


@pytest.fixture
def backend(mini: MiniBackend) -> NydusdBackend:
    """The ``mini`` backend's object (opened by the first manager that uses it)."""
    return mini.backend


@pytest.fixture
def pm(events: EventRecorder, mini: MiniBackend) -> NydusPluginManager:
    return build_plugin_manager([events, mini], entry_points=False, env={})


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
