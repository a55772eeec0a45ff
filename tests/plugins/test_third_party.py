"""A third-party plugin, installed with pip, is loaded by ``containerd-nydus-grpc`` through its entry
point, and its hooks run in that process; ``NYDUS_CORE_PLUGINS_DENY`` keeps it out.

The sample distribution (tests/plugins/sample_plugin) is built and installed by pip into a private
``--target`` directory that the subprocess gets on ``PYTHONPATH``: a real wheel build and install,
found by `importlib.metadata` the ordinary way, without touching the shared environment (other
test sessions run against it concurrently) and without a venv to create.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nydus_core import labels as L
from nydus_core.control.snapshot.model import Kind
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.services import NydusSnapshotter, snapshotter_executable

SAMPLE_SRC = Path(__file__).with_name("sample_plugin")
CLAIM_LABEL = "example.com/sample-claim"
CLAIMED_LABEL = "example.com/sample-claimed"


@pytest.fixture(scope="module")
def sample_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the sample distribution into a private site directory."""
    work = tmp_path_factory.mktemp("sample-plugin")
    src = work / "src"
    shutil.copytree(SAMPLE_SRC, src)  # pip builds in place; keep the repository clean
    site = work / "site"
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
            "--no-index", "--target", str(site), str(src),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "nydus_sample_plugin-0.1.0.dist-info" / "entry_points.txt").is_file()
    return site


@pytest.fixture
def plugin_env(sample_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make subprocesses see the installed sample plugin (and nothing else changes)."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(sample_site), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.delenv("NYDUS_CORE_PLUGINS_DENY", raising=False)
    monkeypatch.delenv("NYDUS_CORE_PLUGINS_ALLOW", raising=False)
    return sample_site


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short: the socket lives inside it
    d = Path(tempfile.mkdtemp(prefix="nyd-3p-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(workdir: Path) -> tuple[NydusSnapshotter, SnapshotterClient]:
    snap = NydusSnapshotter(workdir, workdir / "s.sock", root=workdir / "root")
    snap.start()
    return snap, SnapshotterClient(snap.address)


def claim_layer(client: SnapshotterClient) -> list[str] | grpc.StatusCode:
    """Prepare an unpack snapshot the sample plugin claims; the status code, or the mount types."""
    labels = {L.TARGET_SNAPSHOT_REF: "sha256:sample-layer", CLAIM_LABEL: "yes"}
    try:
        return [m.type for m in client.prepare("extract-1 sha256:sample-layer", labels=labels)]
    except grpc.RpcError as exc:
        return exc.code()


def test_version_lists_the_plugin(plugin_env: Path) -> None:
    out = subprocess.run([snapshotter_executable(), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sample (entry point, nydus-sample-plugin 0.1.0)" in out.stdout


def test_hooks_run_in_the_snapshotter_process(plugin_env: Path, workdir: Path) -> None:
    snap, client = start(workdir)
    try:
        started = (workdir / "root" / "sample-plugin.started").read_text().split()
        assert started == [str(snap.pid), str(workdir / "s.sock")]

        # nydus_claim_layer: containerd is told the layer already exists ...
        assert claim_layer(client) == grpc.StatusCode.ALREADY_EXISTS
        # ... and it is committed under the target name with the plugin's label
        info = client.stat("sha256:sample-layer")
        assert info.kind is Kind.COMMITTED
        assert info.labels[CLAIMED_LABEL] == "yes"
        # a layer without the label is left to containerd
        assert client.prepare("extract-2 sha256:other", labels={L.TARGET_SNAPSHOT_REF: "sha256:other"})
        assert not (workdir / "root" / "sample-plugin.stopping").exists()
    finally:
        client.close()
        snap.stop()
    assert (workdir / "root" / "sample-plugin.stopping").read_text().split() == [started[0]]
    assert "plugins loaded: " in snap.log_tail()
    assert "sample (entry point, nydus-sample-plugin 0.1.0)" in snap.log_tail()


def test_denied_plugin_is_not_called(
    plugin_env: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYDUS_CORE_PLUGINS_DENY", "sample")
    snap, client = start(workdir)
    try:
        assert claim_layer(client) == ["bind"]  # unpacked by containerd as usual
        assert client.stat("extract-1 sha256:sample-layer").kind is Kind.ACTIVE
    finally:
        client.close()
        snap.stop()
    assert not (workdir / "root" / "sample-plugin.started").exists()
    assert not (workdir / "root" / "sample-plugin.stopping").exists()
    assert "plugin sample not loaded (NYDUS_CORE_PLUGINS_DENY)" in snap.log_tail()
    out = subprocess.run([snapshotter_executable(), "--version"], capture_output=True, text=True, timeout=60)
    assert "sample" not in out.stdout


def test_allow_list_without_the_plugin(
    plugin_env: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYDUS_CORE_PLUGINS_ALLOW", "some-other-plugin")
    snap, client = start(workdir)
    try:
        assert claim_layer(client) == ["bind"]
    finally:
        client.close()
        snap.stop()
    assert not (workdir / "root" / "sample-plugin.started").exists()
