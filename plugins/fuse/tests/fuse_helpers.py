"""Test helpers of the fuse plugin: `nydusd-py` as a real process (start, wait for RUNNING, stop,
clean up), and the fusedev backend in a test's own plugin manager."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from nydus_fuse.backend.crash_loop import CrashLoopBreaker
from nydus_fuse.backend.fusedev import CAPABILITIES, FAILOVER_STANDBY, NAME, FusedevBackend

from nydus_core import hookimpl
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.mounts import is_mounted, umount_tree
from nydus_core.plugins import NydusPluginManager, build_plugin_manager
from nydus_core.records import BackendRecord, ConfigOption


def nydusd_py() -> Path:
    """The console script installed next to this interpreter (the `nydus-fuse` distribution)."""
    path = Path(sys.executable).parent / "nydusd-py"
    if not path.exists():
        found = shutil.which("nydusd-py")
        if found is None:
            pytest.skip("nydusd-py is not installed (pip install -e plugins/fuse)")
        path = Path(found)
    return path


@contextlib.contextmanager
def running(root: Path, *extra: str, mountpoint: Path | None = None,
            timeout: float = 20.0) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:  # fmt: skip
    """Start `nydusd-py fuse` under `root`; yields (process, mountpoint, api socket).

    At exit: SIGTERM, and the daemon must exit 0 with its mount and socket gone; a daemon that
    does not is killed and its mount removed so the test still fails cleanly.
    """
    mnt = mountpoint or root / "mnt"
    sock = root / "api.sock"
    log = root / "nydusd.log"
    argv = [str(nydusd_py()), "fuse", "--mountpoint", str(mnt), "--apisock", str(sock),
            "--log-level", "info", "--log-file", str(log), *extra]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with NydusdClient(sock, timeout=5) as c:
            deadline = time.monotonic() + timeout
            while not c.wait_state("RUNNING", timeout=0.2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    logtext = log.read_text() if log.exists() else ""
                    rc = proc.poll()
                    raise AssertionError(f"nydusd-py did not reach RUNNING (rc {rc}): {out}{logtext}")
        yield proc, mnt, sock
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        assert not is_mounted(mnt) and not sock.exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
        umount_tree(mnt)


# --------------------------------------------------------------------------------------------
# The fusedev backend in a plugin manager of the test's own
# --------------------------------------------------------------------------------------------


class FusePlugin:
    """The ``fusedev`` backend record around a `FusedevBackend` the test holds (entry points are
    left out of test plugin managers: a test must not depend on what else is installed)."""

    def __init__(self, backend: FusedevBackend | None = None) -> None:
        self.backend = backend or FusedevBackend()

    @hookimpl
    def nydus_backends(self) -> Iterator[BackendRecord]:
        yield BackendRecord(name=NAME, backend=self.backend, capabilities=CAPABILITIES)

    @hookimpl
    def nydus_config_options(self) -> Iterator[ConfigOption]:
        yield FAILOVER_STANDBY


def fuse_pm(*plugins: object, crash_loop: CrashLoopBreaker | None = None) -> NydusPluginManager:
    """A plugin manager with the built-ins, a fresh fusedev backend (a new snapshotter process
    knows only what is on disk) and `plugins`."""
    fuse = FusePlugin(FusedevBackend(crash_loop))
    return build_plugin_manager([fuse, *plugins], entry_points=False, env={})


def fusedev(pm: NydusPluginManager) -> FusedevBackend:
    """The fusedev backend object of `pm` (opened once a daemon manager has used it)."""
    record = pm.registry.backend(NAME)
    assert record is not None and isinstance(record.backend, FusedevBackend)
    return record.backend


def with_standby(config: SnapshotterConfig, on: bool = True) -> SnapshotterConfig:
    """`config` with ``[daemon] failover_standby`` (the plugin's key) set to `on`."""
    return attrs.evolve(config, plugin_options={**config.plugin_options, FAILOVER_STANDBY.dotted: on})
