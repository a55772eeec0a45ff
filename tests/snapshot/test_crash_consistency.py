"""kill -9 at arbitrary instants never leaves a record without its directory, and Cleanup
removes every directory without a record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import Kind
from nydus_core.control.snapshot.snapshotter import Snapshotter
from nydus_core.plugins import build_plugin_manager

_WORKER = r"""
import sys
from pathlib import Path
from nydus_core.config import SnapshotterConfig
from nydus_core.plugins import build_plugin_manager
from nydus_core.control.snapshot.snapshotter import Snapshotter
root = Path(sys.argv[1])
sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
base = "base"
try:
    sn.stat(base)
except Exception:
    sn.prepare("b0")
    sn.commit(base, "b0")
print("ready", flush=True)
i = int(sys.argv[2])
while True:
    i += 1
    sn.prepare(f"a{i}", base)
    sn.commit(f"c{i}", f"a{i}")
    sn.view(f"v{i}", f"c{i}")
    sn.remove(f"v{i}")
    if i % 3:
        sn.remove(f"c{i}")
"""


def _check(root: Path) -> int:
    sn = Snapshotter(root, SnapshotterConfig(root=root), build_plugin_manager(entry_points=False))
    try:
        snaps = root / "snapshots"
        infos = sn.ms.walk()
        for info in infos:
            sid = sn.ms.get(info.name).id
            assert (snaps / sid / "fs").is_dir(), f"record {info.name} ({sid}) lost its directory"
            if info.kind == Kind.ACTIVE:
                assert (snaps / sid / "work").is_dir()
        sn.cleanup()
        assert set(os.listdir(snaps)) == sn.ms.ids()
        return len(infos)
    finally:
        sn.close()


def test_kill9_at_random_instants(short_tmp: Path) -> None:
    root = short_tmp / "root"
    start = 0
    for attempt, delay in enumerate((0.05, 0.13, 0.21, 0.3, 0.37, 0.44)):
        proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(start)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        n = _check(root)
        assert n >= 1, f"attempt {attempt}: the base snapshot is gone"
        start += 100_000  # fresh keys for the next run
