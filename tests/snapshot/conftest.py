"""A real snapshotter served over a real unix-socket gRPC server, and a client stub for it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import grpc
import pytest

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.server import RunningServer, serve
from nydus_core.control.snapshot.snapshotter import ImageService, Snapshotter
from nydus_core.plugins import build_plugin_manager


@attrs.define
class Served:
    """One running snapshotter: its root, the in-process object, the server and a stub."""

    root: Path
    snapshotter: Snapshotter
    server: RunningServer
    channel: grpc.Channel
    stub: pb_grpc.SnapshotsStub
    socket: Path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir (unix socket paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="nc-snap-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


StartFn = Callable[..., Served]


@pytest.fixture
def start_snapshotter(short_tmp: Path) -> Iterator[StartFn]:
    """Start snapshotters on demand: ``start(plugins=[...], config=..., images=...)``."""
    started: list[Served] = []

    def start(
        plugins: list[object] | None = None,
        config: SnapshotterConfig | None = None,
        images: ImageService | None = None,
        root: Path | None = None,
    ) -> Served:
        root = root or short_tmp / f"root{len(started)}"
        config = config or SnapshotterConfig(root=root)
        pm = build_plugin_manager(plugins=plugins or [], entry_points=False)
        sn = Snapshotter(root, config, pm, images)
        sock = short_tmp / f"s{len(started)}" / "grpc.sock"
        server = serve(sn, sock)
        channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(channel).result(timeout=5)
        served = Served(root, sn, server, channel, pb_grpc.SnapshotsStub(channel), sock)
        started.append(served)
        return served

    yield start
    for s in started:
        s.channel.close()
        s.server.stop(0)
        s.snapshotter.close()


@pytest.fixture
def served(start_snapshotter: StartFn) -> Served:
    return start_snapshotter()


@pytest.fixture
def stub(served: Served) -> pb_grpc.SnapshotsStub:
    return served.stub
