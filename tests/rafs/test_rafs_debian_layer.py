"""A real rootfs layer (Debian minbase + python3, ~170 MB, ~8000 entries) through writer and kernel.

Opt-in because building the layer needs debootstrap and the network: point NYDUS_DEBIAN_LAYER at
an uncompressed layer tar, e.g. one made as in reference/env.md:

    debootstrap --variant=minbase bookworm rootfs http://deb.debian.org/debian
    chroot rootfs apt-get install -y --no-install-recommends python3 && chroot rootfs apt-get clean
    tar --numeric-owner --xattrs --xattrs-include='*' -cf debian-py.tar -C rootfs .
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from rafs_helpers import describe_dir, erofs_mount, extract_with_gnu_tar, have_root

from nydus_core.data.rafs.tree import tree_from_tar
from nydus_core.data.rafs.writer import BuildOptions, build

LAYER = os.environ.get("NYDUS_DEBIAN_LAYER", "")

pytestmark = pytest.mark.skipif(not LAYER or not have_root(), reason="set NYDUS_DEBIAN_LAYER (root needed)")


def test_debian_layer_mounts_like_gnu_tar_extracts(tmp_path: Path) -> None:
    want = describe_dir(extract_with_gnu_tar(Path(LAYER), tmp_path / "x"))
    start = time.perf_counter()
    with open(tmp_path / "blob", "wb") as f:
        result = build(tree_from_tar(LAYER), f, BuildOptions(compressor="none"))
    (tmp_path / "image.boot").write_bytes(result.bootstrap)
    print(f"built in {time.perf_counter() - start:.1f} s, bootstrap {len(result.bootstrap)} B")
    r = subprocess.run(["fsck.erofs", f"--device={tmp_path / 'blob'}", str(tmp_path / "image.boot")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mount(tmp_path / "image.boot", mnt, [tmp_path / "blob"]):
        got = describe_dir(mnt)
        # and the tree is usable: run the image's own python3 from the mount
        code = "import json; print(json.dumps(1))"
        cmd = ["chroot", str(mnt), "/usr/bin/python3", "-c", code]
        out = subprocess.run(cmd, capture_output=True, text=True)
    assert len(want) > 5000
    assert got == want
    assert out.stdout.strip() == "1", out.stderr


def test_debian_layer_as_tarfs(tmp_path: Path) -> None:
    from nydus_core.data.rafs.writer import build_tarfs

    if LAYER.endswith((".gz", ".zst")):
        pytest.skip("tarfs needs the uncompressed tar")
    want = describe_dir(extract_with_gnu_tar(Path(LAYER), tmp_path / "x"))
    (tmp_path / "tarfs.boot").write_bytes(build_tarfs(LAYER).bootstrap)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mount(tmp_path / "tarfs.boot", mnt, [Path(LAYER)]):
        assert describe_dir(mnt) == want
