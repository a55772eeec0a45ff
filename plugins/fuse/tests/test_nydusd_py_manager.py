"""The default fusedev lifecycle hooks (`nydus_fuse.backend.fusedev`) drive `nydusd-py` through the
`DaemonManager`, in both daemon modes: spawn with upstream's command line, wait for RUNNING,
attach by API (shared), serve reads, detach, stop, and respawn after a kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from fuse_helpers import fuse_pm, fusedev, nydusd_py

from nydus_core import labels as L
from nydus_core.config import DaemonConfig, SnapshotterConfig
from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.manager import DaemonManager
from nydus_core.control.daemons.mounts import is_mounted
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.testing.images import Image, build_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")


def _config(root: Path, blob_dir: Path, mode: str) -> SnapshotterConfig:
    template = root / "nydusd-config.json"
    template.write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": ""}}},
        "mode": "direct", "digest_validate": False,
        "fs_prefetch": {"enable": False},
    }))  # fmt: skip
    return SnapshotterConfig(
        root=root,
        daemon_mode=mode,
        daemon=DaemonConfig(nydusd_path=str(nydusd_py()), nydusd_config=template),
    )


def _meta(root: Path, meta_id: str, image: Image) -> ImageSource:
    """A committed meta snapshot holding the image's bootstrap, as the snapshotter leaves it."""
    boot = root / "snapshots" / meta_id / "fs" / "image" / "image.boot"
    boot.parent.mkdir(parents=True)
    shutil.copyfile(image.bootstrap, boot)
    ref = "localhost/test/img:latest"
    return ImageSource(format="nydus", meta_id=meta_id, bootstrap=boot, image_ref=ref,
                       labels={L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: ref})  # fmt: skip


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_manager_drives_nydusd_py(mode: str, root: Path) -> None:
    files = {"etc/motd": b"from nydusd-py\n", "data/big": os.urandom(1_500_000)}
    img = build_image(root / "build", files)
    img2 = build_image(root / "build2", {"two.txt": b"2\n"}, name="two")
    for blob in img2.blob_dir.iterdir():
        shutil.copyfile(blob, img.blob_dir / blob.name)
    config = _config(root, img.blob_dir, mode)
    pm = fuse_pm()
    mgr = DaemonManager(config, pm)
    try:
        mgr.recover()
        a = mgr.ensure_instance(_meta(root, "11", img), {})
        b = mgr.ensure_instance(_meta(root, "12", img2), {})
        assert (a.mountpoint / "etc/motd").read_bytes() == files["etc/motd"]
        assert (a.mountpoint / "data/big").read_bytes() == files["data/big"]
        assert (b.mountpoint / "two.txt").read_bytes() == b"2\n"
        daemons = mgr.daemons()
        assert len(daemons) == (2 if mode == "dedicated" else 1)
        daemon = mgr.daemon(a.daemon_id)
        assert daemon is not None
        with open(f"/proc/{daemon.pid}/cmdline", "rb") as f:
            argv = [x.decode() for x in f.read().split(b"\0") if x]
        assert "fuse" in argv and "--apisock" in argv and ("--bootstrap" in argv) == (mode == "dedicated")
        with NydusdClient(daemon.api_socket) as c:
            assert c.state() == "RUNNING"
            sid = "" if mode == "dedicated" else "11"
            assert c.blobcache_metrics(sid)["underlying_files"] == [
                str(config.cache_dir / f"{img.blob_id}.blob.data")
            ]
        # kill -9: the liveness check notices and the restart policy respawns it, images included
        os.kill(daemon.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while fusedev(pm).alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mgr.check_liveness()
        assert (a.mountpoint / "etc/motd").read_bytes() == files["etc/motd"]
        assert (b.mountpoint / "two.txt").read_bytes() == b"2\n"
        # Cleanup: the images go; dedicated daemons stop, the shared one stays up, empty
        mgr.release_unused(set())
        assert not is_mounted(a.mountpoint) and not is_mounted(b.mountpoint)
        if mode == "dedicated":
            assert mgr.daemons() == []
        else:
            (shared,) = mgr.daemons()
            assert fusedev(pm).alive(shared) is True
            assert list((root / "mnt").iterdir()) == []
            fusedev(pm).stop(shared)
            assert not is_mounted(root / "mnt")
    finally:
        mgr.close()
