"""Shared helpers for the integration tests: a containerd namespace per test, cleaned afterwards.

The session fixtures (registry, containerd, snapshotter, test image) come from the
``nydus_core.testing`` pytest plugin; this file only adds per-test isolation, so one test's
images and snapshots never change what the next test sees under the snapshotter root.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from nydus_core.testing.services import Containerd

SNAPSHOTTERS = ("nydus", "overlayfs")


def remove_all_snapshots(containerd: Containerd, namespace: str, snapshotter: str) -> None:
    """Remove every snapshot of `snapshotter` in `namespace`, children before parents."""
    for _ in range(20):
        listed = containerd.ctr("snapshots", "--snapshotter", snapshotter, "ls",
                                namespace=namespace, check=False, timeout=60)
        rows = [line.split() for line in listed.stdout.splitlines()[1:] if line.strip()]
        if not rows:
            return
        parents = {row[1] for row in rows if len(row) >= 3}
        leaves = [row[0] for row in rows if row[0] not in parents]
        for key in leaves:
            containerd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key,
                           namespace=namespace, check=False, timeout=60)


def cleanup_namespace(containerd: Containerd, namespace: str) -> None:
    """Delete tasks, containers, images and snapshots, then collect garbage so the backend is clean."""
    containerd.cleanup_namespace(namespace)
    images = containerd.ctr("images", "ls", "-q", namespace=namespace, check=False).stdout.split()
    if images:
        containerd.ctr("images", "rm", "--sync", *images, namespace=namespace, check=False)
    for snapshotter in SNAPSHOTTERS:
        remove_all_snapshots(containerd, namespace, snapshotter)
    containerd.gc(namespace)


@pytest.fixture
def ns(containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[str]:
    """A containerd namespace for this test only (derived from the session's unique namespace)."""
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    namespace = f"{containerd.namespace}-{name}"
    yield namespace
    cleanup_namespace(containerd, namespace)
