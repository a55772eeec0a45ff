"""Reading images made by upstream nydus-image 2.2 (shared/fixtures/nydus)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from rafs_helpers import erofs_mount, have_root

from nydus_core.data.rafs import DigestMismatch, RafsError
from nydus_core.data.rafs.blob import digest, read_toc, read_toc_section, verify_blob_data
from nydus_core.data.rafs.bootstrap import BlobSet, Bootstrap, bootstrap_from_blob

FIX = Path("/work/shared/fixtures/nydus")
BOOT = FIX / "bootstrap" / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
TOC_BLOB = FIX / "toc" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"

pytestmark = pytest.mark.skipif(not BOOT.exists(), reason="nydus fixtures not present")


def test_bootstrap_tables() -> None:
    bs = Bootstrap.open(BOOT)
    assert bs.compressor == "zstd" and bs.digester == "blake3"
    assert [b.blob_id for b in bs.blobs] == [BLOB_ID]
    assert bs.blobs[0].chunk_count == 2 and bs.ext.chunk_size == 1 << 20
    assert bs.erofs.sb.root_nid == 128
    names = {p for p, _ in bs.walk()}
    assert names == {b"", b"lib.rs", b"sync_io.rs"}


def test_files_read_with_every_chunk_verified() -> None:
    bs = Bootstrap.open(BOOT)
    with BlobSet.from_dir(bs, str(FIX / "blobs")) as blobs:
        lib = blobs.read_file(bs.erofs.lookup("lib.rs"))
        sync = blobs.read_file(bs.erofs.lookup("sync_io.rs"))
    assert len(lib) == 16931 and len(sync) == 13400
    assert lib.startswith(b"// Copyright (C) 2020 Alibaba Cloud.")
    assert b"fn " in sync
    # the digests the bootstrap holds are blake3 of exactly these bytes
    assert {c.digest for c in bs.chunks} == {digest(0, lib), digest(0, sync)}


def test_blob_toc_sections_and_digest_array() -> None:
    bs = Bootstrap.open(BOOT)
    with open(FIX / "blobs" / BLOB_ID, "rb") as f:
        toc = read_toc(f, BLOB_ID, expected_digest=bs.blobs[0].blob_toc_digest)
        assert set(toc.entries) == {b"image.blob", b"blob.meta", b"blob.meta.header", b"blob.digest"}
        assert toc.size == bs.blobs[0].blob_toc_size
        digests = read_toc_section(f, toc, b"blob.digest", BLOB_ID)
        verify_blob_data(f, toc, BLOB_ID)  # image.blob digest = sha256(chunk data + tar header)
    chunk_digests = sorted(bs.chunks, key=lambda c: c.index)
    assert digests == b"".join(c.digest for c in chunk_digests)


def test_blob_with_inlined_bootstrap_read_through_toc() -> None:
    with open(TOC_BLOB, "rb") as f:
        boot = bootstrap_from_blob(f, TOC_BLOB.name)
    bs = Bootstrap(boot)
    assert len(boot) == 20480
    with BlobSet(bs, {bs.blobs[0].blob_id: str(TOC_BLOB)}) as blobs:
        files = {p.decode(): blobs.read_file(i) for p, i in bs.walk() if i.is_reg}
    assert {k: len(v) for k, v in files.items()} == {"error.rs": 2816, "lib.rs": 678, "logger.rs": 3115}
    assert all(v.startswith(b"// Copyright 2020 Ant Group.") for v in files.values())


def test_flipped_blob_byte_is_a_clear_error(tmp_path: Path) -> None:
    bs = Bootstrap.open(BOOT)
    data = bytearray((FIX / "blobs" / BLOB_ID).read_bytes())
    data[100] ^= 0x40  # inside lib.rs's compressed chunk
    (tmp_path / BLOB_ID).write_bytes(bytes(data))
    with (
        BlobSet.from_dir(bs, str(tmp_path)) as blobs,
        pytest.raises(RafsError, match=f"blob {BLOB_ID} chunk 0"),
    ):
        blobs.read_file(bs.erofs.lookup("lib.rs"))


def test_wrong_digest_in_metadata_is_named(tmp_path: Path) -> None:
    raw = bytearray(BOOT.read_bytes())
    bs = Bootstrap(bytes(raw))
    # corrupt the digest stored for chunk index 1 (sync_io.rs) in the chunk table
    pos = bs.ext.chunk_table_offset + next(i for i, c in enumerate(bs.chunks) if c.index == 1) * 80
    raw[pos] ^= 0xFF
    bad = Bootstrap(bytes(raw))
    with BlobSet.from_dir(bad, str(FIX / "blobs")) as blobs, pytest.raises(DigestMismatch, match="chunk 1"):
        blobs.read_file(bad.erofs.lookup("sync_io.rs"))


def test_truncated_bootstrap_is_rejected() -> None:
    raw = BOOT.read_bytes()
    with pytest.raises(RafsError, match="multiple of 4096"):
        Bootstrap(raw[:10000])
    with pytest.raises(RafsError, match="chunk table"):
        Bootstrap(raw[:16384])
    with pytest.raises(RafsError):
        Bootstrap(raw[:512])


def test_toc_missing_or_corrupt() -> None:
    with pytest.raises(RafsError, match="ToC"):
        read_toc(io.BytesIO(b"\0" * 4096))
    bs = Bootstrap.open(BOOT)
    data = bytearray((FIX / "blobs" / BLOB_ID).read_bytes())
    data[-600] ^= 1  # inside the ToC entries, which the bootstrap pins by sha256
    with pytest.raises(RafsError, match="ToC digest"):
        read_toc(io.BytesIO(bytes(data)), BLOB_ID, expected_digest=bs.blobs[0].blob_toc_digest)


@pytest.mark.skipif(not have_root() or shutil.which("mount") is None, reason="needs root")
def test_kernel_mounts_upstream_bootstrap(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with erofs_mount(BOOT, mnt):
        assert sorted(p.name for p in mnt.iterdir()) == ["lib.rs", "sync_io.rs"]
        assert (mnt / "lib.rs").stat().st_size == 16931


def test_blob_ci_table_matches_bootstrap_chunk_table() -> None:
    from nydus_core.data.rafs.blob import read_blob_ci

    bs = Bootstrap.open(BOOT)
    entry = bs.blobs[0]
    with open(FIX / "blobs" / BLOB_ID, "rb") as f:
        header, chunks = read_blob_ci(
            f, entry.ci_offset, entry.ci_compressed_size, entry.chunk_count, BLOB_ID
        )
    assert header.features == entry.features
    by_index = {c.index: c for c in bs.chunks}
    for c in chunks:
        info = by_index[c.index]
        assert (c.compressed_offset, c.compressed_size, c.uncompressed_offset, c.uncompressed_size) == (
            info.compressed_offset,
            info.compressed_size,
            info.uncompressed_offset,
            info.uncompressed_size,
        )


def test_read_range_touches_only_needed_chunks() -> None:
    bs = Bootstrap.open(BOOT)
    with BlobSet.from_dir(bs, str(FIX / "blobs")) as blobs:
        lib = bs.erofs.lookup("lib.rs")
        whole = blobs.read_file(lib)
        assert blobs.read_range(lib, 100, 50) == whole[100:150]
        assert blobs.read_range(lib, 16900, 1000) == whole[16900:]
        assert blobs.read_range(lib, 20000, 10) == b""


def test_rebuilding_upstream_content_gives_upstream_inodes() -> None:
    """Same files, same options: our inodes are byte-identical to nydus-image 2.2's (root: but i_ino)."""
    from nydus_core.data.rafs.erofs import ErofsImage
    from nydus_core.data.rafs.tree import tree_from_bootstrap
    from nydus_core.data.rafs.writer import BuildOptions, build

    up = BOOT.read_bytes()
    bs = Bootstrap(up)
    with BlobSet.from_dir(bs, str(FIX / "blobs")) as blobs:
        root = tree_from_bootstrap(bs, blobs.read_file)
        for node in root.entries.values():
            node.stored = None  # write the data again instead of referencing upstream's blob
        result = build(root, io.BytesIO(), BuildOptions(compressor="zstd", digester="blake3"))
    ours_img, up_img = ErofsImage(result.bootstrap), ErofsImage(up)
    pairs = list(zip(ours_img.walk(), up_img.walk(), strict=True))
    for (path, ours), (_, theirs) in pairs:
        a = bytearray(result.bootstrap[ours.offset : ours.offset + 64])
        b = bytearray(up[theirs.offset : theirs.offset + 64])
        if path == b"":
            a[20:24] = b[20:24] = b"\0\0\0\0"  # i_ino: upstream numbers the root 0, we use 1
        assert (path, ours.nid, bytes(a)) == (path, theirs.nid, bytes(b))
    assert sorted(c.digest for c in Bootstrap(result.bootstrap).chunks) == sorted(c.digest for c in bs.chunks)
    # Everything else in the bootstrap is identical too, except what must differ: the blob's id and
    # sizes (our zstd frames differ by a byte), the 512 KiB (2.2: 2 MiB) device alignment, root i_ino.
    boot = result.bootstrap
    assert len(boot) == len(up)
    differ = {i for i in range(len(up)) if boot[i] != up[i]}
    allowed = set(range(1408, 1408 + 64)) | {1476, 1477}  # device slot tag, mapped_blkaddr
    allowed |= set(range(4096, 4096 + 256))  # blob table entry
    allowed |= set(range(bs.ext.chunk_table_offset, bs.ext.chunk_table_offset + bs.ext.chunk_table_size))
    allowed |= set(range(up_img.root.offset + 20, up_img.root.offset + 24))
    assert differ <= allowed, sorted(differ - allowed)[:10]
