"""The nydus snapshotter returns exactly the mounts containerd's own overlayfs snapshotter returns.

For plain OCI layers upstream nydus falls back to overlayfs behaviour, and users rely on that
(tools inspect the mounts, runc consumes them). The same snapshot chain is built through
containerd's Snapshots API for both snapshotters; the mount lists must be equal once each
snapshotter's root and snapshot ids are replaced by placeholders.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from nydus_core.testing.services import Containerd, NydusSnapshotter

pytestmark = pytest.mark.containerd

Shape = list[tuple[str, str, tuple[str, ...]]]
#: As ``ctr snapshots`` does: without a GC root label (or a lease) containerd's collector may
#: delete these snapshots between two calls of the test.
GC_ROOT = {"containerd.io/gc.root": "mount-shape-test"}


class Normalizer:
    """Replaces ``<root>/snapshots/<id>`` with ``ROOT/snapshots/ID<n>``, n in order of appearance."""

    def __init__(self, root: Path):
        self._pattern = re.compile(re.escape(str(root)) + r"/snapshots/([^/:,]+)")
        self._ids: dict[str, str] = {}

    def _sub(self, m: re.Match[str]) -> str:
        ident = self._ids.setdefault(m.group(1), f"ID{len(self._ids)}")
        return f"ROOT/snapshots/{ident}"

    def __call__(self, text: str) -> str:
        return self._pattern.sub(self._sub, text)


def build_chain(
    stub: SnapshotsStub, md: tuple[tuple[str, str], ...], snapshotter: str, norm: Callable[[str], str]
) -> dict[str, Shape]:
    """Walk the same chain of Prepare/Commit/View calls and record every mount list."""
    shapes: dict[str, Shape] = {}

    def record(step: str, mounts: object) -> None:
        shapes[step] = [(m.type, norm(m.source), tuple(norm(o) for o in m.options)) for m in mounts]  # type: ignore[attr-defined]

    def prepare(key: str, parent: str = "") -> None:
        resp = stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=GC_ROOT),
            metadata=md,
        )
        record(f"prepare {key}", resp.mounts)

    def commit(name: str, key: str) -> None:
        stub.Commit(
            pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=GC_ROOT), metadata=md
        )

    prepare("a")
    commit("c1", "a")
    prepare("b", "c1")
    commit("c2", "b")
    prepare("c", "c2")
    commit("c3", "c")
    prepare("d", "c3")  # an active snapshot on three layers, like a container rootfs
    record("mounts d", stub.Mounts(pb.MountsRequest(snapshotter=snapshotter, key="d"), metadata=md).mounts)
    for view, parent in (("v1", "c1"), ("v2", "c2"), ("v3", "c3")):
        resp = stub.View(
            pb.ViewSnapshotRequest(snapshotter=snapshotter, key=view, parent=parent, labels=GC_ROOT),
            metadata=md,
        )
        record(f"view {view}", resp.mounts)
    return shapes


def test_mount_shapes_match_containerd_overlayfs(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, ns: str
) -> None:
    md = containerd.metadata(ns)
    with containerd.channel() as channel:
        stub = SnapshotsStub(channel)
        try:
            overlay = build_chain(stub, md, "overlayfs", Normalizer(containerd.overlayfs_root))
        except grpc.RpcError as e:
            pytest.fail(f"containerd's overlayfs snapshotter refused the chain: {e}")
        nydus = build_chain(stub, md, "nydus", Normalizer(nydus_snapshotter.root))
    # Sanity: the reference really has the three shapes (bind rw, overlay, bind ro / lowerdir-only).
    assert overlay["prepare a"][0][0] == "bind"
    assert overlay["prepare d"][0][0] == "overlay"
    assert overlay["view v1"][0][0] == "bind"
    for step, expected in overlay.items():
        assert nydus[step] == expected, f"{step}: nydus mounts differ from overlayfs"
