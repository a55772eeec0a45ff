"""The pytest plugin (`nydus_core.testing`): fixtures a backend author uses, used for real here.

Also the in-process half of the lifecycle hooks: `nydus_snapshotter_started` and
`nydus_snapshotter_stopping` (the subprocess half is in tests/cli).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from nydus_core import hookimpl
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import Kind, Mount, MountRequest
from nydus_core.testing import PluginManagerFactory, SnapshotterFactory

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """Remembers lifecycle events, and what the snapshotter looked like when they fired."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.socket_at_start: bool | None = None
        self.config: SnapshotterConfig | None = None

    @hookimpl
    def nydus_snapshotter_started(self, root: str, config: SnapshotterConfig) -> None:
        self.events.append(("started", root))
        self.socket_at_start = Path(config.address).exists()
        self.config = config

    @hookimpl
    def nydus_snapshotter_stopping(self, root: str) -> None:
        self.events.append(("stopping", root))


def test_nydus_snapshotter_started(snapshotter: SnapshotterFactory, nydus_config: SnapshotterConfig) -> None:
    rec = Recorder()
    client = snapshotter(rec)
    assert rec.events == [("started", str(nydus_config.root))]
    # fired once the socket listens, with the configuration in force
    assert rec.socket_at_start is True
    assert rec.config is nydus_config
    assert client.list() == []


def test_nydus_snapshotter_stopping(snapshotter: SnapshotterFactory, nydus_config: SnapshotterConfig) -> None:
    rec = Recorder()
    client = snapshotter(rec)
    client.prepare("active-1")
    client.stop()
    assert rec.events == [("started", str(nydus_config.root)), ("stopping", str(nydus_config.root))]
    assert not nydus_config.address.exists()
    client.stop()  # idempotent: the hook does not fire twice
    assert len(rec.events) == 2


def test_failing_started_hook_does_not_stop_serving(snapshotter: SnapshotterFactory) -> None:
    class Broken:
        @hookimpl
        def nydus_snapshotter_started(self, root: str) -> None:
            raise RuntimeError("listener bug")

    client = snapshotter(Broken())
    assert client.list() == []


def test_plugin_manager_factory(nydus_plugin_manager: PluginManagerFactory, tmp_path: Path) -> None:
    class Kata:
        @hookimpl
        def nydus_mounts(self, request: MountRequest, config: SnapshotterConfig) -> list[Mount]:
            return [Mount(type="kata", source=str(request.upper))]

    pm = nydus_plugin_manager(Kata())
    req = MountRequest(id="1", key="k", kind=Kind.ACTIVE, upper=tmp_path, work=tmp_path, lowers=(), labels={})
    assert pm.hook.nydus_mounts(request=req, config=SnapshotterConfig()) == [
        Mount(type="kata", source=str(tmp_path))
    ]
    assert pm.get_plugin("nydus_core.control.snapshot.overlay_mounts") is not None
    no_builtins = nydus_plugin_manager(builtins=False)
    assert no_builtins.get_plugin("nydus_core.control.snapshot.overlay_mounts") is None


def test_root_and_config(snapshotter_root: Path, nydus_config: SnapshotterConfig) -> None:
    assert snapshotter_root.is_dir()
    assert stat.S_IMODE(snapshotter_root.stat().st_mode) == 0o700
    assert len(str(snapshotter_root).encode()) <= 40
    assert nydus_config.root == snapshotter_root
    assert Path(nydus_config.address).parent == snapshotter_root


def test_client_covers_every_rpc(snapshotter: SnapshotterFactory) -> None:
    client = snapshotter()
    sock = client.address
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

    mounts = client.prepare("layer-1-active", labels={"x": "1"})
    assert [m.type for m in mounts] == ["bind"]
    upper = Path(mounts[0].source)
    (upper / "hello").write_text("hi")
    assert client.mounts("layer-1-active") == mounts
    client.commit("layer-1", "layer-1-active", labels={"y": "2"})
    info = client.stat("layer-1")
    assert info.kind is Kind.COMMITTED
    assert info.labels == {"y": "2"}  # containerd: Commit's labels replace the active's
    usage = client.usage("layer-1")
    assert usage.size >= 2 and usage.inodes >= 1

    view = client.view("v", parent="layer-1")
    assert view and view[0].source  # a read-only mount of layer-1
    updated = client.update(type(info)(name="layer-1", kind=info.kind, labels={"y": "3"}), "labels.y")
    assert updated.labels == {"y": "3"}
    assert {i.name for i in client.list()} == {"layer-1", "v"}
    assert [i.name for i in client.list("kind==view")] == ["v"]

    with pytest.raises(grpc.RpcError) as err:
        client.remove("layer-1")  # has a child
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.remove("v")
    client.remove("layer-1")
    client.cleanup()
    assert client.list() == []
    with pytest.raises(grpc.RpcError) as err:
        client.stat("layer-1")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_calling_again_restarts_on_the_same_root(snapshotter: SnapshotterFactory) -> None:
    rec = Recorder()
    first = snapshotter(rec)
    first.prepare("a")
    second = snapshotter(rec)
    assert first.running.stopped
    assert [e for e, _ in rec.events] == ["started", "stopping", "started"]
    assert [i.name for i in second.list()] == ["a"]


DOC_EXAMPLE_RE = re.compile(r"<!-- ten-line example -->\s*```python\n(.*?)```", re.DOTALL)


def test_docs_example_runs_and_root_is_unmounted(tmp_path: Path) -> None:
    """The ten-line example in docs/hooks.md passes as written, in a separate pytest run that only
    has the installed pytest11 plugin; a tmpfs left mounted under the root is unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    match = DOC_EXAMPLE_RE.search((REPO / "docs" / "hooks.md").read_text())
    assert match, "docs/hooks.md lost its ten-line example"
    example = match.group(1)
    assert len([line for line in example.splitlines() if line.strip()]) <= 12
    marker = tmp_path / "root.txt"
    extra = f"""

import subprocess
from pathlib import Path

def test_leaves_a_mount(snapshotter_root):
    (snapshotter_root / "m").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(snapshotter_root / "m")], check=True)
    Path({str(marker)!r}).write_text(str(snapshotter_root))
"""
    (tmp_path / "test_example.py").write_text(example + extra)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    root = marker.read_text()
    assert f" {root}/m " not in Path("/proc/self/mountinfo").read_text()
    assert not Path(root).exists()


MINI_NYDUSD = REPO / "tests" / "daemon" / "mini_nydusd.py"

DAEMON_TEST = """
import json, os, sys
from pathlib import Path

import attrs
from nydus_core import hookimpl, labels as L
from nydus_core.control.daemons.nydusd import NydusdBackend
from nydus_core.records import BackendRecord


class Purging(NydusdBackend):  # the stand-in nydusd: upstream's command line and API
    def purge(self, root):
        Path(MARKER + ".purged").write_text(str(root))


class MiniBackend:
    @hookimpl
    def nydus_backends(self):
        yield BackendRecord(name="mini", backend=Purging())


def test_image_served_by_a_daemon(snapshotter, nydus_config, snapshotter_root):
    wrapper = snapshotter_root / "mini-nydusd"
    wrapper.write_text(f'#!/bin/sh\\nexec {sys.executable} {MINI!r} "$@"\\n')
    wrapper.chmod(0o755)
    daemon = attrs.evolve(nydus_config.daemon, nydusd_path=str(wrapper), fs_driver="mini")
    client = snapshotter(MiniBackend(), config=attrs.evolve(nydus_config, daemon=daemon))
    labels = {L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: "docker.io/library/busybox:latest"}
    [bind] = client.prepare("meta-active", labels=labels)
    boot = Path(bind.source) / "image" / "image.boot"
    boot.parent.mkdir()
    boot.write_text(json.dumps({"files": {"hello": "hi"}}))
    client.commit("meta", "meta-active", labels=labels)
    client.prepare("c1", parent="meta")
    [daemon] = client.running.images.daemons()
    os.kill(daemon.pid, 0)
    Path(MARKER).write_text(str(daemon.pid))
"""


def test_backend_purge_and_stop_at_fixture_teardown(tmp_path: Path) -> None:
    """A real stop leaves daemons running; the fixture's teardown must not leak them."""
    if not MINI_NYDUSD.exists():
        pytest.skip("tests/daemon/mini_nydusd.py (the stand-in nydusd) is not there")
    if os.geteuid() != 0:
        pytest.skip("the stand-in daemon serves images with real mounts")
    marker = tmp_path / "pid"
    (tmp_path / "test_daemon.py").write_text(
        f"MINI = {str(MINI_NYDUSD)!r}\nMARKER = {str(marker)!r}\n" + DAEMON_TEST
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_daemon.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pid = int(marker.read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    # and then the backend was told to end what it keeps beside its daemons for that root
    assert Path(str(marker) + ".purged").read_text().startswith("/")
