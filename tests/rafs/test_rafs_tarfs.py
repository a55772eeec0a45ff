"""tar-tarfs: metadata-only bootstraps (512-byte EROFS blocks) whose device is the layer tar itself."""

from __future__ import annotations

import hashlib
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

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.bootstrap import FLAG_TARFS_MODE, BlobSet, Bootstrap
from nydus_core.data.rafs.writer import BuildOptions, build_tarfs

FIX_TAR = Path("/work/shared/fixtures/nydus/tar/all-entry-type.tar")


def test_tarfs_bootstrap_reads_files_from_the_tar(tmp_path: Path) -> None:
    result = build_tarfs(str(FIX_TAR))
    bs = Bootstrap(result.bootstrap)
    assert bs.erofs.sb.blkszbits == 9 and bs.ext.flags & FLAG_TARFS_MODE
    assert bs.blobs[0].blob_id == hashlib.sha256(FIX_TAR.read_bytes()).hexdigest()
    assert bs.blobs[0].compressed_size == bs.blobs[0].uncompressed_size == FIX_TAR.stat().st_size
    with BlobSet(bs, {bs.blobs[0].blob_id: str(FIX_TAR)}) as blobs:
        data = blobs.read_file(bs.erofs.lookup("tar/dir1/dir3/hardlink1.txt"))
    assert len(data) == 15


def test_tarfs_refuses_compressed_layers(tmp_path: Path) -> None:
    import gzip

    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(FIX_TAR.read_bytes()))
    with pytest.raises(RafsError, match="uncompressed tar"):
        build_tarfs(str(gz))


@pytest.mark.skipif(not have_root(), reason="needs root (mknod, mount)")
@pytest.mark.parametrize("chunk_size", [1 << 20, 4096])
def test_kernel_mounts_tarfs_with_the_tar_as_device(tmp_path: Path, chunk_size: int) -> None:
    src = tmp_path / "src"
    make_source_tree(src)
    tar = create_with_gnu_tar(src, tmp_path / "layer.tar")
    want = describe_dir(extract_with_gnu_tar(tar, tmp_path / "x"))
    boot = tmp_path / "tarfs.boot"
    boot.write_bytes(build_tarfs(str(tar), BuildOptions(chunk_size=chunk_size)).bootstrap)
    assert boot.stat().st_size < 200 * 1024, "metadata only"
    # (fsck.erofs 1.5 cannot check it: "blksize 512 isn't supported"; the kernel is the judge)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mount(boot, mnt, [tar]):
        assert describe_dir(mnt) == want


def test_cli_tar_tarfs(tmp_path: Path) -> None:
    from nydus_core.cli.nydus_image import main

    boot = tmp_path / "t.boot"
    digest = "sha256:" + "ab" * 32
    assert main(["create", "--type", "tar-tarfs", "-B", str(boot), "--blob-id", digest, str(FIX_TAR)]) == 0
    bs = Bootstrap.open(boot)
    assert bs.blobs[0].blob_id == "ab" * 32
    assert list(tmp_path.iterdir()) == [boot]
