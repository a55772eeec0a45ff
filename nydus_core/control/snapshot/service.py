"""The gRPC servicer: `containerd.services.snapshots.v1.Snapshots` messages <-> the Snapshotter.

Kept thin on purpose: all semantics live in `Snapshotter`/`MetaStore`. Here we only translate
messages (containerd's ``contrib/snapshotservice`` adaptor is the model: Active->ACTIVE,
View->VIEW, anything else COMMITTED; List in batches of at most 100) and map errors to status
codes: a `SnapshotterError` carries its code, anything else is INTERNAL and logged with its
traceback (a hook's bug must fail one call, never the process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from nydus_core.api.containerd.types import mount_pb2
from nydus_core.control.snapshot.model import Info, Kind, Mount
from nydus_core.control.snapshot.snapshotter import Snapshotter
from nydus_core.errors import SnapshotterError, status_code

log = logging.getLogger(__name__)

LIST_BATCH = 100
# containerd's gRPC messages are limited to 16 MiB: a batch is also cut at this many bytes, so
# snapshots with large labels never make a List fail with RESOURCE_EXHAUSTED.
LIST_BATCH_BYTES = 1 << 20

T = TypeVar("T")


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_proto(info: Info) -> pb.Info:
    kind = {Kind.ACTIVE: pb.ACTIVE, Kind.VIEW: pb.VIEW}.get(info.kind, pb.COMMITTED)
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=kind,
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
        labels=info.labels,
    )


def info_from_proto(msg: pb.Info) -> Info:
    kinds = {pb.ACTIVE: Kind.ACTIVE, pb.VIEW: Kind.VIEW, pb.COMMITTED: Kind.COMMITTED}
    kind = kinds.get(msg.kind, Kind.UNKNOWN)
    return Info(
        name=msg.name,
        kind=kind,
        parent=msg.parent,
        labels=dict(msg.labels),
        created_at=msg.created_at.seconds * 1_000_000_000 + msg.created_at.nanos,
        updated_at=msg.updated_at.seconds * 1_000_000_000 + msg.updated_at.nanos,
    )


def mounts_to_proto(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
            for m in mounts]


def list_batches(infos: Iterable[Info]) -> Iterator[pb.ListSnapshotsResponse]:
    """`infos` in messages of at most `LIST_BATCH` entries and about `LIST_BATCH_BYTES` bytes
    (containerd's adaptor cuts at 100; the byte bound is ours)."""
    batch: list[pb.Info] = []
    size = 0
    for info in infos:
        msg = info_to_proto(info)
        n = msg.ByteSize()
        if batch and (len(batch) >= LIST_BATCH or size + n > LIST_BATCH_BYTES):
            yield pb.ListSnapshotsResponse(info=batch)
            batch, size = [], 0
        batch.append(msg)
        size += n
    if batch:
        yield pb.ListSnapshotsResponse(info=batch)


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """Serves one Snapshotter; the ``snapshotter`` request field (the plugin name) is ignored."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SnapshotterError as exc:
            log.debug("%s: %s: %s", rpc, exc.grpc_status, exc)
            self._abort(context, status_code(exc), str(exc) or exc.__class__.__name__)
        except Exception as exc:
            log.exception("%s failed", rpc)
            self._abort(context, grpc.StatusCode.INTERNAL, f"{rpc}: {exc.__class__.__name__}: {exc}")

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort always raises

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "Prepare",
                            lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "View",
                            lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "Mounts", lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=mounts_to_proto(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> Any:
        self._call(context, "Commit", lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> Any:
        self._call(context, "Remove", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> Any:
        info = self._call(context, "Stat", lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info_to_proto(info))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._call(context, "Update", lambda: self.sn.update(info_from_proto(request.info), paths))
        return pb.UpdateSnapshotResponse(info=info_to_proto(info))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        infos = self._call(context, "List", lambda: self.sn.list(list(request.filters)))
        yield from list_batches(infos)

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> Any:
        usage = self._call(context, "Usage", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> Any:
        self._call(context, "Cleanup", self.sn.cleanup)
        return empty_pb2.Empty()
