"""Several containers at once, and a snapshotter restart under a running container.

containerd calls the snapshotter from many goroutines; these tests make it do so for real
(parallel ``ctr run``) and check that a graceful restart of the snapshotter neither disturbs a
running container (its overlay is already mounted) nor forgets the container's snapshot.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from nydus_core.testing.services import (
    BUSYBOX_LAYER2_FILE,
    BUSYBOX_LAYER2_TEXT,
    Containerd,
    NydusSnapshotter,
)

pytestmark = pytest.mark.containerd


def test_parallel_containers_on_one_image(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, busybox_image: str, ns: str
) -> None:
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", busybox_image, namespace=ns)

    def run(i: int) -> str:
        return containerd.ctr("run", "--rm", "--snapshotter", "nydus", busybox_image, f"par-{i}",
                              "/bin/sh", "-c", f"echo container {i}; cat {BUSYBOX_LAYER2_FILE}",
                              namespace=ns).stdout

    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(run, range(4)))
    assert outputs == [f"container {i}\n{BUSYBOX_LAYER2_TEXT}\n" for i in range(4)]
    listed = containerd.ctr("snapshots", "--snapshotter", "nydus", "ls", namespace=ns).stdout
    kinds = [line.split()[-1] for line in listed.splitlines()[1:]]
    assert kinds == ["Committed"] * 3, "each container's active snapshot must be gone after --rm"


def test_graceful_restart_under_running_container(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, busybox_image: str, ns: str
) -> None:
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", busybox_image, namespace=ns)
    containerd.ctr("run", "-d", "--snapshotter", "nydus", busybox_image, "long-lived",
                   "/bin/sh", "-c", "echo written-before > /tmp/state; sleep 120", namespace=ns)
    nydus_snapshotter.restart()
    containerd.wait_until_reachable("nydus", "long-lived", namespace=ns)

    # The running container still sees its files; its writable layer survived the restart.
    out = containerd.ctr("tasks", "exec", "--exec-id", "probe", "long-lived", "/bin/cat", "/tmp/state",
                         namespace=ns).stdout
    assert out == "written-before\n"
    info = containerd.ctr("snapshots", "--snapshotter", "nydus", "info", "long-lived", namespace=ns).stdout
    assert '"Kind": "Active"' in info, "the container's snapshot was forgotten across the restart"

    containerd.kill_task("long-lived", namespace=ns)
    containerd.ctr("containers", "delete", "long-lived", namespace=ns)
    listed = containerd.ctr("snapshots", "--snapshotter", "nydus", "ls", namespace=ns).stdout
    assert "long-lived" not in listed
