"""`nydus-image export --block`: bootstrap + uncompressed blobs in one file, mounted with no device=."""

from __future__ import annotations

from pathlib import Path

import pytest
from rafs_helpers import (
    create_with_gnu_tar,
    describe_dir,
    erofs_mount,
    extract_with_gnu_tar,
    have_root,
    make_source_tree,
)

from nydus_core.cli.nydus_image import main

pytestmark = pytest.mark.skipif(not have_root(), reason="needs root (mknod, mount)")


@pytest.mark.parametrize("kind", ["zstd", "tarfs"])
def test_flat_image_mounts_alone(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    make_source_tree(src)
    tar = create_with_gnu_tar(src, tmp_path / "layer.tar")
    want = describe_dir(extract_with_gnu_tar(tar, tmp_path / "x"))
    boot, flat = tmp_path / "image.boot", tmp_path / "image.disk"
    if kind == "tarfs":
        assert main(["create", "--type", "tar-tarfs", "-B", str(boot), str(tar)]) == 0
        blob_args = ["--blob", str(tar)]
    else:
        assert main(["create", "-B", str(boot), "-b", str(tmp_path / "blob"), "-c", "zstd", str(tar)]) == 0
        blob_args = ["--blob", str(tmp_path / "blob")]
    assert main(["export", "--block", "-B", str(boot), *blob_args, "-O", str(flat)]) == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mount(flat, mnt):  # no device=: the kernel finds each blob at its mapped_blkaddr
        assert describe_dir(mnt) == want
