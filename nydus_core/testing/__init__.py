"""pytest plugin for nydus-core and for third-party plugin authors (entry point ``pytest11``).

Installed with nydus-core, so any test session gets these fixtures without a conftest:

* ``nydus_plugin_manager`` - factory: ``nydus_plugin_manager(*plugins, entry_points=False)``
  builds a plugin manager with the built-ins and exactly the plugins given (installed entry
  points are left out unless asked for, so a test does not depend on what else is installed);
* ``snapshotter_root`` - a fresh, short root directory (the root is limited to 70 bytes); at
  teardown everything still mounted below it is unmounted before it is deleted;
* ``nydus_config`` - a `SnapshotterConfig` for that root (socket inside it, log to stdout);
* ``snapshotter`` - factory: ``snapshotter(*plugins)`` starts an in-process snapshotter with those
  plugins exactly as ``containerd-nydus-grpc`` would (daemon manager, metastore, socket, the
  started hook) and returns an `InProcessSnapshotter`, a gRPC client of the real socket with
  ``prepare/view/mounts/commit/remove/stat/list/usage/update/cleanup``. Calling it again on the
  same root restarts the snapshotter (recovery tests). Daemon liveness sweeps are off unless
  ``liveness_interval=`` is given (the console script sweeps every 5 s). At teardown the
  servers are stopped, and the daemons they left running (which a real stop keeps alive on
  purpose) are stopped through their backend (`Backend.stop`), then `Backend.purge` ends what the
  backends keep beside them.

Fixtures for real services (docker-registry, containerd, test images) live in
`nydus_core.testing.services`. A ten-line example is in ``docs/hooks.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

from nydus_core.cli.lifecycle import AUTO, RunningSnapshotter
from nydus_core.config import DaemonConfig, LogConfig, SnapshotterConfig, SystemConfig
from nydus_core.plugins import NydusPluginManager, build_plugin_manager
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.cri import cri_api  # noqa: F401  (fixture)
from nydus_core.testing.services import *  # noqa: F403
from nydus_core.testing.services import unmount_below

log = logging.getLogger(__name__)

__all__ = [
    "InProcessSnapshotter",
    "PluginManagerFactory",
    "SnapshotterClient",
    "SnapshotterFactory",
    "nydus_config",
    "nydus_plugin_manager",
    "snapshotter",
    "snapshotter_root",
]


class PluginManagerFactory(Protocol):
    def __call__(
        self,
        *plugins: object,
        entry_points: bool = False,
        builtins: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> NydusPluginManager: ...


class InProcessSnapshotter(SnapshotterClient):
    """A client of an in-process snapshotter, with handles on its parts for white-box checks.

    ``.running`` is the `RunningSnapshotter` (``.snapshotter``, ``.images``, ``.server``),
    ``.pm`` the plugin manager, ``.config`` and ``.root`` its configuration.
    """

    def __init__(self, running: RunningSnapshotter) -> None:
        super().__init__(running.address)
        self.running = running
        self.pm = running.pm
        self.config = running.config
        self.root = Path(running.config.root)

    def stop(self) -> None:
        """Stop serving as SIGTERM would (daemons keep running); idempotent."""
        self.close()
        self.running.stop()


class SnapshotterFactory(Protocol):
    def __call__(
        self,
        *plugins: object,
        config: SnapshotterConfig | None = None,
        entry_points: bool = False,
        builtins: bool = True,
        images: Any = AUTO,
        liveness_interval: float | None = None,
    ) -> InProcessSnapshotter: ...


@pytest.fixture
def nydus_plugin_manager() -> PluginManagerFactory:
    """Factory of plugin managers with the built-ins and the given plugins."""

    def make(
        *plugins: object,
        entry_points: bool = False,
        builtins: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> NydusPluginManager:
        return build_plugin_manager(plugins, entry_points=entry_points, builtins=builtins, env=env)

    return make


@pytest.fixture
def snapshotter_root() -> Iterator[Path]:
    """A new root under the system temp dir (short: socket paths and the 70-byte limit)."""
    base = tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="nyd-", dir=base if len(base) <= 30 else "/tmp"))
    yield root
    # rm -rf through a mounted overlay or FUSE mount would delete what it exposes.
    unmount_below(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nydus_config(snapshotter_root: Path) -> SnapshotterConfig:
    """A configuration for `snapshotter_root`: socket inside it, log to stdout, defaults otherwise.

    The nydusd template path points into the root (absent: the built-in template is used), so a
    host's ``/etc/nydus/nydusd-config.json`` cannot change what a test sees.
    """
    return SnapshotterConfig(
        root=snapshotter_root,
        address=snapshotter_root / "snapshotter.sock",
        daemon=DaemonConfig(nydusd_config=snapshotter_root / "nydusd-config.json"),
        log=LogConfig(log_to_stdout=True, level="debug"),
        system=SystemConfig(enable=False, address=snapshotter_root / "system.sock"),
    )


@pytest.fixture
def snapshotter(
    nydus_plugin_manager: PluginManagerFactory, nydus_config: SnapshotterConfig
) -> Iterator[SnapshotterFactory]:
    """Factory starting in-process snapshotters; all are stopped (and their daemons) at teardown."""
    started: list[InProcessSnapshotter] = []
    daemons: dict[str, Any] = {}

    def remember_daemons(client: InProcessSnapshotter) -> None:
        images = client.running.images
        if images is not None and hasattr(images, "daemons"):
            with contextlib.suppress(Exception):
                daemons.update({d.id: (d, client.pm) for d in images.daemons()})

    def start(
        *plugins: object,
        config: SnapshotterConfig | None = None,
        entry_points: bool = False,
        builtins: bool = True,
        images: Any = AUTO,
        liveness_interval: float | None = None,
    ) -> InProcessSnapshotter:
        cfg = config or nydus_config
        for previous in started:
            if not previous.running.stopped and Path(previous.config.root) == Path(cfg.root):
                remember_daemons(previous)
                previous.stop()
        pm = nydus_plugin_manager(*plugins, entry_points=entry_points, builtins=builtins)
        running = RunningSnapshotter.start(cfg, pm, images=images, liveness_interval=liveness_interval)
        client = InProcessSnapshotter(running)
        started.append(client)
        client.wait_ready()
        return client

    yield start

    for client in started:
        if not client.running.stopped:
            remember_daemons(client)
        client.stop()
    for daemon, pm in daemons.values():
        _stop_daemon(daemon, pm)
    for root in {c.running.config.root for c in started}:
        for client in started:
            if client.running.config.root == root:
                _purge(Path(root), client.pm)
                break


def _purge(root: Path, pm: NydusPluginManager) -> None:
    """What backends keep running for the root besides daemons (the fusedev session holder,
    which outlives the snapshotter on purpose) goes now that the test's daemons are gone."""
    for name, registered in pm.registry.backends.items():
        try:
            registered.record.backend.purge(root)
        except Exception:
            log.exception("purge of backend %s failed", name)


def _stop_daemon(daemon: Any, pm: NydusPluginManager) -> None:
    """Stop a daemon a test left running: through its backend, else by its recorded pid."""
    name = getattr(daemon, "fs_driver", "")
    record = pm.registry.backend(name)
    try:
        if record is not None:
            record.backend.stop(daemon)
            return
    except Exception:
        log.exception("stopping daemon %s through backend %s failed", getattr(daemon, "id", "?"), name)
    pid = int(getattr(daemon, "pid", 0) or 0)
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
