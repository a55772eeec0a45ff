"""A multi-layer image pulled and run through containerd with ``--snapshotter nydus``.

These are the user-visible promises of a snapshotter: containerd can unpack an image into it,
runc can start a container on the mounts it returns, every layer is visible, and a crash of the
snapshotter between pull and run loses nothing. Everything is real (registry, containerd, runc).
"""

from __future__ import annotations

import time

import pytest

from nydus_core.testing.services import (
    BUSYBOX_LAYER2_FILE,
    BUSYBOX_LAYER2_TEXT,
    BUSYBOX_LAYER3_FILE,
    BUSYBOX_LAYER3_TEXT,
    Containerd,
    NydusSnapshotter,
    wait_until,
)

pytestmark = pytest.mark.containerd

SHOW_LAYERS = f"echo started; cat {BUSYBOX_LAYER2_FILE} {BUSYBOX_LAYER3_FILE}"
EXPECTED = ["started", BUSYBOX_LAYER2_TEXT, BUSYBOX_LAYER3_TEXT]


def pull(containerd: Containerd, ns: str, ref: str) -> None:
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref, namespace=ns)


def committed_snapshots(containerd: Containerd, ns: str) -> list[str]:
    """Keys of the Committed snapshots containerd records for the nydus snapshotter in `ns`."""
    out = containerd.ctr("snapshots", "--snapshotter", "nydus", "ls", namespace=ns).stdout
    return [line.split()[0] for line in out.splitlines()[1:] if line.split()[-1:] == ["Committed"]]


def snapshot_dirs(snapshotter: NydusSnapshotter) -> set[str]:
    d = snapshotter.snapshots_dir
    return {p.name for p in d.iterdir()} if d.exists() else set()


def test_pull_and_run_multilayer_image(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, busybox_image: str, ns: str
) -> None:
    pull(containerd, ns, busybox_image)
    assert len(committed_snapshots(containerd, ns)) == 3, "one committed snapshot per layer"
    assert len(snapshot_dirs(nydus_snapshotter)) >= 3, "layers must live under the snapshotter root"

    out = containerd.ctr("run", "--rm", "--snapshotter", "nydus", busybox_image, "pull-run",
                         "/bin/sh", "-c", SHOW_LAYERS, namespace=ns).stdout
    assert out.splitlines() == EXPECTED


def test_container_rootfs_is_built_from_snapshotter_dirs(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, busybox_image: str, ns: str
) -> None:
    """The running container's rootfs is an overlay whose layers sit under the nydus root."""
    pull(containerd, ns, busybox_image)
    containerd.ctr("run", "-d", "--snapshotter", "nydus", busybox_image, "rootfs-check",
                   "/bin/sleep", "60", namespace=ns)
    rootfs = containerd.state / "io.containerd.runtime.v2.task" / ns / "rootfs-check" / "rootfs"
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f if line.split()[4] == str(rootfs)]
    assert rows, f"no mount at {rootfs}"
    fields = rows[-1]
    sep = fields.index("-")
    fstype, options = fields[sep + 1], fields[sep + 3]
    assert fstype == "overlay"
    assert str(nydus_snapshotter.root) in options
    assert options.count(str(nydus_snapshotter.snapshots_dir)) >= 4, "3 lowerdirs + upperdir"


#: containerd 1.6 re-dials a proxy snapshotter that went away after about 1 s, then 1.6 times as
#: long each time, 3 s at most (+-20%); every call in between fails at once with the last dial
#: error (``connect: connection refused``), even once the restarted snapshotter is serving. Down
#: for longer than that, the restarted one is nearly always ready between two re-dials.
DOWN_PAST_REDIALS = 4.0


@pytest.mark.parametrize("down_for", [0.0, DOWN_PAST_REDIALS], ids=["prompt", "down-past-redials"])
def test_run_after_snapshotter_kill9_and_restart(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, busybox_image: str, ns: str,
    down_for: float,
) -> None:
    """State written before a SIGKILL survives: containerd's recorded keys still resolve.

    The restarted snapshotter is waited for through containerd before anything else goes through
    containerd: `NydusSnapshotter.restart` waits for the socket only, and a restart that is ready
    after one of containerd's re-dials (``down-past-redials``, or a loaded machine) is reached
    only at the next one."""
    pull(containerd, ns, busybox_image)
    layers = committed_snapshots(containerd, ns)
    assert len(layers) == 3
    before = snapshot_dirs(nydus_snapshotter)
    old_pid = nydus_snapshotter.pid
    nydus_snapshotter.kill9()
    try:
        probe = containerd.ctr("snapshots", "--snapshotter", "nydus", "prepare", "probe-while-down",
                               namespace=ns, check=False, timeout=60)
        assert probe.returncode != 0, "containerd reached a snapshotter that was killed"
        time.sleep(down_for)
    finally:
        nydus_snapshotter.restart()
    assert nydus_snapshotter.pid != old_pid
    # containerd's link to the snapshotter is back only at its next re-dial: nothing through
    # containerd before that (restart() waited for the socket only)
    containerd.wait_until_reachable("nydus", layers[0], namespace=ns)
    assert committed_snapshots(containerd, ns) == layers
    assert snapshot_dirs(nydus_snapshotter) == before

    out = containerd.ctr("run", "--rm", "--snapshotter", "nydus", busybox_image, "after-kill",
                         "/bin/sh", "-c", SHOW_LAYERS, namespace=ns).stdout
    assert out.splitlines() == EXPECTED


def test_image_rm_and_gc_leave_no_snapshot_dirs(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, busybox_image: str, ns: str
) -> None:
    baseline = snapshot_dirs(nydus_snapshotter)
    pull(containerd, ns, busybox_image)
    containerd.ctr("run", "--rm", "--snapshotter", "nydus", busybox_image, "gc-run", "/bin/true",
                   namespace=ns)
    assert snapshot_dirs(nydus_snapshotter) - baseline, "the pull created no snapshot directory"

    # --sync makes containerd run its garbage collector before returning; it removes the
    # now-unreferenced snapshots through the proxy's Remove (children first).
    containerd.ctr("images", "rm", "--sync", busybox_image, namespace=ns)
    wait_until(lambda: snapshot_dirs(nydus_snapshotter) == baseline, 30,
               "the image's snapshot directories to be removed")
    assert committed_snapshots(containerd, ns) == []
    listed = containerd.ctr("snapshots", "--snapshotter", "nydus", "ls", namespace=ns).stdout
    assert listed.splitlines()[1:] == []
