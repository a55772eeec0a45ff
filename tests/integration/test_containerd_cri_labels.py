"""Pulling through CRI, as a kubelet does: the ``cri.*`` labels reach the snapshotter or not.

The README tells users to set ``disable_snapshot_annotations = false``; containerd's default
(true) silently withholds the labels nydus needs to find an image's layers. Both settings are
checked against a CRI-enabled containerd with its own snapshotter, by asking the snapshotter
itself (its own socket) which labels it stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from nydus_core.testing.services import (
    BUSYBOX_LAYER2_FILE,
    BUSYBOX_LAYER2_TEXT,
    Containerd,
    CriSettings,
    NydusSnapshotter,
    Registry,
    unmount_below,
)

pytestmark = pytest.mark.containerd

CRI_LABELS = (
    "containerd.io/snapshot/cri.image-ref",
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/cri.manifest-digest",
    "containerd.io/snapshot/cri.image-layers",
)


@pytest.fixture(scope="module", params=[False, True], ids=["annotations-on", "annotations-default-off"])
def cri_stack(
    request: pytest.FixtureRequest, registry: Registry, nydus_services_dir: Path
) -> Iterator[tuple[Containerd, NydusSnapshotter, bool]]:
    """A CRI-enabled containerd and its own snapshotter; param = disable_snapshot_annotations."""
    if not Path("/usr/lib/cni").exists():
        pytest.fail("/usr/lib/cni missing: apt-get install containerd (it pulls containernetworking-plugins)")
    disabled: bool = request.param
    base = nydus_services_dir / f"cri-{'off' if disabled else 'on'}"
    sock = base / "nydus" / "nydus.sock"
    snap = NydusSnapshotter(base / "nydus", sock)
    ctrd = Containerd(
        base / "containerd",
        {"nydus": sock},
        cri=CriSettings(disable_snapshot_annotations=disabled, plain_http_registries=(registry.host,)),
    )
    snap.start()
    try:
        ctrd.start()
        try:
            yield ctrd, snap, disabled
        finally:
            ctrd.stop()
    finally:
        snap.stop()
        unmount_below(base)


def backend_labels(snap: NydusSnapshotter) -> dict[str, dict[str, str]]:
    """Every snapshot the snapshotter itself stores, by backend key, with its labels."""
    with grpc.insecure_channel(f"unix://{snap.address}") as channel:
        return {
            info.name: dict(info.labels)
            for resp in SnapshotsStub(channel).List(pb.ListSnapshotsRequest())
            for info in resp.info
        }


def test_cri_pull_labels_reach_snapshotter(
    cri_api: tuple[ModuleType, ModuleType],
    cri_stack: tuple[Containerd, NydusSnapshotter, bool],
    busybox_image: str,
) -> None:
    ctrd, snap, annotations_disabled = cri_stack
    cri_pb2, cri_grpc = cri_api
    with ctrd.channel() as channel:
        stub = cri_grpc.ImageServiceStub(channel)
        resp = stub.PullImage(
            cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=busybox_image)), timeout=120
        )
    assert resp.image_ref.startswith("sha256:")

    layers = {key: labels for key, labels in backend_labels(snap).items() if key.startswith("k8s.io/")}
    assert len(layers) == 3, f"expected one committed snapshot per layer, got {sorted(layers)}"
    for key, labels in layers.items():
        present = [name for name in CRI_LABELS if name in labels]
        if annotations_disabled:
            assert present == [], f"{key}: CRI sent {present} although annotations are disabled"
        else:
            assert present == list(CRI_LABELS), f"{key}: missing CRI labels, got {sorted(labels)}"
            assert labels["containerd.io/snapshot/cri.image-ref"] == busybox_image

    cid = f"cri-run-{secrets.token_hex(3)}"
    out = ctrd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "nydus",
        busybox_image,
        cid,
        "/bin/cat",
        BUSYBOX_LAYER2_FILE,
        namespace="k8s.io",
    ).stdout
    assert out == BUSYBOX_LAYER2_TEXT + "\n"
