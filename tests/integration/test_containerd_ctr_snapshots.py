"""``ctr snapshots --snapshotter nydus`` subcommands work end to end through containerd.

This is what an operator types when debugging; every subcommand goes containerd -> proxy -> us.
"""

from __future__ import annotations

import os
import stat

import pytest

from nydus_core.testing.services import Containerd, NydusSnapshotter, wait_until

pytestmark = pytest.mark.containerd


def snapshot_dirs(snapshotter: NydusSnapshotter) -> set[str]:
    d = snapshotter.snapshots_dir
    return {p.name for p in d.iterdir()} if d.exists() else set()


def test_ctr_snapshots_lifecycle(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, ns: str
) -> None:
    def snap(*args: str) -> str:
        return containerd.ctr("snapshots", "--snapshotter", "nydus", *args, namespace=ns).stdout

    dirs_before = snapshot_dirs(nydus_snapshotter)
    snap("prepare", "base")
    mounts = snap("mounts", "/mnt/target", "base")
    words = mounts.split()  # mount -t bind <source> <target> -o rw,rbind
    assert words[:3] == ["mount", "-t", "bind"]
    assert words[3].startswith(f"{nydus_snapshotter.snapshots_dir}/") and words[3].endswith("/fs")
    assert words[4:] == ["/mnt/target", "-o", "rw,rbind"]

    snap("commit", "base-committed", "base")
    snap("prepare", "child", "base-committed")
    mounts = snap("mounts", "/mnt/target", "child")
    assert mounts.startswith("mount -t overlay overlay ")
    assert "lowerdir=" in mounts and "upperdir=" in mounts and "workdir=" in mounts

    rows = {line.split()[0]: line.split()[1:] for line in snap("ls").splitlines()[1:]}
    assert rows == {"base-committed": ["Committed"], "child": ["base-committed", "Active"]}

    info = snap("info", "child")
    assert '"Name": "child"' in info and '"Parent": "base-committed"' in info and '"Kind": "Active"' in info

    usage = snap("usage", "base-committed").splitlines()
    assert usage[0].split() == ["KEY", "SIZE", "INODES"]
    assert usage[1].split()[0] == "base-committed"

    refused = containerd.ctr("snapshots", "--snapshotter", "nydus", "rm", "base-committed",
                             namespace=ns, check=False)
    assert refused.returncode != 0, "a snapshot with a child must not be removable"
    snap("rm", "child")
    snap("rm", "base-committed")
    assert snap("ls").splitlines()[1:] == []
    # containerd deletes backend snapshots only when its garbage collector runs.
    containerd.gc(ns)
    wait_until(lambda: snapshot_dirs(nydus_snapshotter) == dirs_before, 30,
               "the removed snapshots' directories to go")


def test_socket_is_private(nydus_snapshotter: NydusSnapshotter) -> None:
    """Anyone who can connect can create mounts as root: the socket must not be world-accessible."""
    mode = stat.S_IMODE(os.stat(nydus_snapshotter.address).st_mode)
    assert mode & 0o007 == 0, f"socket mode {mode:o} lets other users connect"
    assert stat.S_ISSOCK(os.stat(nydus_snapshotter.address).st_mode)
