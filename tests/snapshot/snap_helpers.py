"""Small helpers shared by the snapshot tests (thin wrappers over the generated stub)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc


def prepare(stub: pb_grpc.SnapshotsStub, key: str, parent: str = "", **labels: str) -> list[Any]:
    return list(stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="nydus", key=key, parent=parent,
                                                       labels=labels)).mounts)


def prepare_l(stub: pb_grpc.SnapshotsStub, key: str, parent: str, labels: dict[str, str]) -> list[Any]:
    return list(stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)


def view(stub: pb_grpc.SnapshotsStub, key: str, parent: str = "", **labels: str) -> list[Any]:
    return list(stub.View(pb.ViewSnapshotRequest(key=key, parent=parent, labels=labels)).mounts)


def commit(stub: pb_grpc.SnapshotsStub, name: str, key: str, **labels: str) -> None:
    stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))


def commit_l(stub: pb_grpc.SnapshotsStub, name: str, key: str, labels: dict[str, str]) -> None:
    stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels))


def stat(stub: pb_grpc.SnapshotsStub, key: str) -> Any:
    return stub.Stat(pb.StatSnapshotRequest(key=key)).info


def remove(stub: pb_grpc.SnapshotsStub, key: str) -> None:
    stub.Remove(pb.RemoveSnapshotRequest(key=key))


def mounts(stub: pb_grpc.SnapshotsStub, key: str) -> list[Any]:
    return list(stub.Mounts(pb.MountsRequest(key=key)).mounts)


def usage(stub: pb_grpc.SnapshotsStub, key: str) -> tuple[int, int]:
    r = stub.Usage(pb.UsageRequest(key=key))
    return r.size, r.inodes


def update(stub: pb_grpc.SnapshotsStub, name: str, labels: dict[str, str], paths: list[str] | None) -> Any:
    req = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=labels))
    if paths is not None:
        req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return stub.Update(req).info


def list_names(stub: pb_grpc.SnapshotsStub, *filters: str) -> list[str]:
    return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info)


def shape(ms: list[Any]) -> list[tuple[str, str, list[str]]]:
    return [(m.type, m.source, list(m.options)) for m in ms]


def expect_code(code: grpc.StatusCode, fn: Callable[[], object]) -> str:
    """Run `fn`, require an RpcError with `code`, return its details."""
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())
