"""End to end through the Snapshotter: a nydus pull, a container on it served by a real daemon
process, the kernel's overlay over the daemon's mount, and Cleanup stopping the daemon."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_helpers import pid_alive

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.manager import DaemonManager
from nydus_core.control.daemons.mounts import is_mounted, umount_tree
from nydus_core.control.snapshot.snapshotter import Snapshotter
from nydus_core.errors import AlreadyExists
from nydus_core.plugins import NydusPluginManager

REF = "127.0.0.1:5000/nydus/busybox:latest-nydus"


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_container_on_nydus_image(
    mode: str,
    root: Path,
    make_config: Callable[..., SnapshotterConfig],
    pm: NydusPluginManager,
    tmp_path: Path,
) -> None:
    config = make_config(mode)
    mgr = DaemonManager(config, pm)
    mgr.recover()
    snap = Snapshotter(root, config, pm, images=mgr)
    try:
        cri = {L.CRI_IMAGE_REF: REF}
        # the data blob is claimed: containerd never downloads it
        with pytest.raises(AlreadyExists):
            snap.prepare("extract-1 sha256:blob", "",
                         {L.TARGET_SNAPSHOT_REF: "sha256:blob", L.NYDUS_BLOB: "true", **cri})  # fmt: skip
        # the bootstrap layer is unpacked by containerd, then committed
        meta_labels = {L.TARGET_SNAPSHOT_REF: "sha256:meta", L.NYDUS_BOOTSTRAP: "true", **cri}
        snap.prepare("extract-2 sha256:meta", "sha256:blob", meta_labels)
        meta_id = snap.ms.get("extract-2 sha256:meta").id
        boot = root / "snapshots" / meta_id / "fs" / "image" / "image.boot"
        boot.parent.mkdir(parents=True)
        boot.write_text('{"files": {"etc/motd": "served lazily\\n"}}')
        snap.commit("sha256:meta", "extract-2 sha256:meta", meta_labels)
        assert mgr.instances() == []  # no daemon at pull time

        mounts = snap.prepare("container-1", "sha256:meta")
        inst = mgr.get_instance(meta_id)
        assert inst is not None
        want_mp = root / "snapshots" / meta_id / "mnt" if mode == "dedicated" else root / "mnt" / meta_id
        assert inst.mountpoint == want_mp
        assert len(mounts) == 1 and mounts[0].type == "overlay"
        assert f"lowerdir={want_mp}" in mounts[0].options
        # what containerd would do: mount it and read the image through the daemon's mount
        target = tmp_path / "rootfs"
        target.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(mounts[0].options), str(target)],
                       check=True)  # fmt: skip
        try:
            assert (target / "etc" / "motd").read_text() == "served lazily\n"
            (target / "written-by-container").write_text("x")
        finally:
            umount_tree(target)
        # a second container of the same image shares the instance
        snap.prepare("container-2", "sha256:meta")
        assert len(mgr.daemons()) == 1
        daemon = mgr.daemons()[0]

        for key in ("container-1", "container-2", "sha256:meta", "sha256:blob"):
            snap.remove(key)
        snap.cleanup()
        assert mgr.get_instance(meta_id) is None
        assert not is_mounted(want_mp)
        if mode == "dedicated":
            assert not pid_alive(daemon.pid) and mgr.daemons() == []
        else:  # the shared daemon stays up, empty
            assert pid_alive(daemon.pid)
    finally:
        snap.close()
        mgr.close()
