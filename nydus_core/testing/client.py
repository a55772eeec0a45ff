"""A small synchronous client of the snapshots API, speaking gRPC like containerd does.

Tests use it to drive a snapshotter through its socket (in-process server or the
``containerd-nydus-grpc`` subprocess) with model types (`Mount`, `Info`, `Usage`) instead of
protobuf messages. gRPC errors are not translated: assert on ``exc.code()`` as containerd does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import grpc
from google.protobuf import field_mask_pb2

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from nydus_core.control.snapshot.model import Info, Mount, Usage
from nydus_core.control.snapshot.service import info_from_proto, info_to_proto

DEFAULT_NAME = "nydus"  # the proxy plugin name containerd puts in every request


def _mounts(messages: Iterable[object]) -> list[Mount]:
    return [
        Mount(type=m.type, source=m.source, target=m.target, options=tuple(m.options))  # type: ignore[attr-defined]
        for m in messages
    ]


class SnapshotterClient:
    """Calls `containerd.services.snapshots.v1.Snapshots` on ``unix://<address>``."""

    def __init__(self, address: Path | str, *, name: str = DEFAULT_NAME, timeout: float = 30.0) -> None:
        self.address = Path(address)
        self.name = name
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{self.address}")
        self.stub = SnapshotsStub(self.channel)

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return _mounts(self.stub.Prepare(req, timeout=self.timeout).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        req = pb.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return _mounts(self.stub.View(req, timeout=self.timeout).mounts)

    def mounts(self, key: str) -> list[Mount]:
        req = pb.MountsRequest(snapshotter=self.name, key=key)
        return _mounts(self.stub.Mounts(req, timeout=self.timeout).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key, labels=labels or {})
        self.stub.Commit(req, timeout=self.timeout)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.name, key=key), timeout=self.timeout)

    def stat(self, key: str) -> Info:
        resp = self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.name, key=key), timeout=self.timeout)
        return info_from_proto(resp.info)

    def list(self, *filters: str) -> list[Info]:
        req = pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        return [info_from_proto(i) for resp in self.stub.List(req, timeout=self.timeout) for i in resp.info]

    def usage(self, key: str) -> Usage:
        resp = self.stub.Usage(pb.UsageRequest(snapshotter=self.name, key=key), timeout=self.timeout)
        return Usage(size=resp.size, inodes=resp.inodes)

    def update(self, info: Info, *paths: str) -> Info:
        """Update labels of ``info.name``; `paths` is the field mask (``labels.<key>`` or ``labels``)."""
        req = pb.UpdateSnapshotRequest(
            snapshotter=self.name,
            info=info_to_proto(info),
            update_mask=field_mask_pb2.FieldMask(paths=list(paths)) if paths else None,
        )
        return info_from_proto(self.stub.Update(req, timeout=self.timeout).info)

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.name), timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SnapshotterClient:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
