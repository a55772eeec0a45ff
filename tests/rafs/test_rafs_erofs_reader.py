"""Our EROFS reader against images made by mkfs.erofs (1.5) from a directory we control."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from rafs_helpers import describe_dir, describe_erofs, erofs_mount, have_root, make_source_tree

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.erofs import LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, ErofsImage

pytestmark = pytest.mark.skipif(not have_root() or shutil.which("mkfs.erofs") is None,
                                reason="needs root (mknod, chown) and mkfs.erofs")  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("erofs-src") / "src"
    make_source_tree(src)
    return src


def mkfs(out: Path, src: Path, *args: str) -> None:
    subprocess.run(["mkfs.erofs", "--quiet", *args, str(out), str(src)], check=True, capture_output=True)


def test_plain_image_matches_source(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "plain.erofs"
    mkfs(img, source, "-x1")  # share every repeated xattr
    image = ErofsImage.open(str(img))
    assert image.sb.feature_compat & 1, "mkfs 1.5 sets the superblock checksum"
    assert describe_erofs(image) == describe_dir(source)
    layouts = {ino.layout for _, ino in image.walk()}
    assert LAYOUT_FLAT_INLINE in layouts
    shared = sum(image.data[i.offset + i.inode_size + 4] for _, i in image.walk() if i.xattr_icount)
    assert shared > 0, "the image must exercise shared xattrs"
    many = image.lookup("many")
    assert many.size > image.blksz, "a multi-block directory"


def test_reader_agrees_with_kernel(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "k.erofs"
    mkfs(img, source)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mount(img, mnt):
        assert describe_erofs(ErofsImage.open(str(img))) == describe_dir(mnt)


@pytest.mark.parametrize("chunksize", [4096, 8192])
def test_chunk_based_block_map(source: Path, tmp_path: Path, chunksize: int) -> None:
    img = tmp_path / "c.erofs"
    mkfs(img, source, f"--chunksize={chunksize}")
    image = ErofsImage.open(str(img))
    assert any(i.layout == LAYOUT_CHUNK_BASED for _, i in image.walk())
    assert describe_erofs(image) == describe_dir(source)


def test_chunk_indexes_with_blob_device(source: Path, tmp_path: Path) -> None:
    img, blob = tmp_path / "meta.erofs", tmp_path / "blob.img"
    mkfs(img, source, "--chunksize=4096", f"--blobdev={blob}")
    image = ErofsImage.open(str(img))
    assert len(image.devices) == 1
    big = image.lookup("big.bin")
    assert {c.device_id for c in image.chunk_indexes(big)} == {1}
    assert describe_erofs(image, [blob.read_bytes()]) == describe_dir(source)


def test_compact_inodes(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "compact.erofs"
    mkfs(img, source, "-T1234567", "--ignore-mtime")
    image = ErofsImage.open(str(img))
    compact = [i for _, i in image.walk() if not i.extended]
    assert compact, "fixed timestamp lets mkfs use 32-byte inodes"
    assert all(i.mtime == 1234567 for i in compact)
    want = {k: v[:5] + v[6:] for k, v in describe_dir(source).items()}
    got = {k: v[:5] + v[6:] for k, v in describe_erofs(image).items()}
    assert got == want


def test_checksum_and_truncation_are_detected(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "x.erofs"
    mkfs(img, source)
    data = bytearray(img.read_bytes())
    data[1024 + 16] ^= 0xFF  # inode count, covered by the checksum
    with pytest.raises(RafsError, match="checksum mismatch"):
        ErofsImage(bytes(data))
    with pytest.raises(RafsError, match="magic"):
        ErofsImage(b"\0" * 4096)
    with pytest.raises(RafsError, match="too short"):
        ErofsImage(bytes(img.read_bytes()[:1000]))
    cut = ErofsImage(img.read_bytes()[:8192])  # superblock intact, meta area gone
    with pytest.raises(RafsError, match="outside the image"):
        list(cut.walk())


def test_corrupt_dirent_is_reported(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "d.erofs"
    mkfs(img, source)
    image = ErofsImage.open(str(img))
    many = image.lookup("many")
    assert many.layout in (0, 2)
    data = bytearray(image.data)
    first_block = many.u * image.blksz
    struct.pack_into("<H", data, first_block + 8, 5)  # nameoff of dirent 0: not a multiple of 12
    with pytest.raises(RafsError, match="bad first name offset"):
        ErofsImage(bytes(data), verify_checksum=False).readdir(many)
