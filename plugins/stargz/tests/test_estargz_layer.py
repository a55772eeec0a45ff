"""An eStargz layer read through its TOC: footer, TOC member, bootstrap, and the gzip-member decoder.

Blobs come from `estargz_writer` (in memory) and the upstream fixture TOC. Each layer's bootstrap
is served by a real `RafsInstance` over the localfs backend with the plugin's decoder, so the
bytes a reader gets went through the blob cache's digest check, as in a daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from estargz_writer import Item, footer, unpacked, write_estargz
from nydus_stargz.bootstrap import LayerBootstrap, build_layer
from nydus_stargz.decoder import GZIP_MEMBER_DECODER
from nydus_stargz.toc import (
    TocError,
    parse_footer,
    parse_toc,
    read_toc_member,
)

from nydus_core.data.cache import CacheError
from nydus_core.data.decoders import NATIVE_DECODER, DecoderSet
from nydus_core.data.rafs.bootstrap import Bootstrap
from nydus_core.data.rafs.erofs import decode_rdev
from nydus_core.data.rafs.writer import merge_bootstraps
from nydus_core.data.runtime.instance import RafsInstance
from nydus_core.data.runtime.nydusd_json import NydusdConfig
from nydus_core.records import DecoderRecord
from nydus_core.testing.images import localfs_config

# estargz_sample.json: the upstream nydus TOC fixture (shared/fixtures/nydus/stargz), kept here.
FIXTURE = Path(__file__).parent / "data"
DECODERS = DecoderSet(
    [
        DecoderRecord(name="estargz-gzip", decoder=GZIP_MEMBER_DECODER, priority=10),
        DecoderRecord(name="nydus-native", decoder=NATIVE_DECODER, priority=-100),
    ]
)

BIG = os.urandom((9 << 20) + 77)
ITEMS = [
    Item("bin/", "dir", mode=0o755),
    Item("bin/tool", data=os.urandom(70_000), mode=0o755),
    Item("bin/tool-link", "hardlink", link="bin/tool", mode=0o755),
    Item("bin/sh", "symlink", link="tool", mode=0o777),
    Item("data/", "dir", mode=0o700, uid=1000, gid=1000),
    Item("data/big.bin", data=BIG, mode=0o600, uid=1000, gid=1000),
    Item("data/a.txt", data=b"a" * 10, xattrs={"user.k": b"v\x00\xff"}),
    Item("data/b.txt", data=b"b" * 5000),
    Item("data/empty", data=b""),
    Item("dev/", "dir"),
    Item("dev/null", "char", dev=(1, 3), mode=0o666),
    Item("dev/loop0", "block", dev=(7, 0), mode=0o660),
    Item("dev/pipe", "fifo"),
    Item("etc/.wh.gone", data=b""),
    Item("opaque/", "dir"),
    Item("opaque/.wh..wh..opq", data=b""),
]


def layer(tmp_path: Path, blob: bytes, name: str = "l1") -> tuple[Path, str, LayerBootstrap]:
    """Write `blob` as a localfs blob named by its digest, convert its TOC; (bootstrap, id, built)."""
    blob_id = hashlib.sha256(blob).hexdigest()
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    (blobs / blob_id).write_bytes(blob)
    f = parse_footer(blob[-64:], len(blob))
    toc_file = read_toc_member(blob[f.toc_offset : len(blob) - f.size])
    built = build_layer(
        parse_toc(toc_file.json_bytes),
        toc_file,
        blob_id=blob_id,
        blob_size=len(blob),
        toc_offset=f.toc_offset,
    )
    boot = tmp_path / f"{name}.boot"
    boot.write_bytes(built.bootstrap)
    return boot, blob_id, built


def instance(tmp_path: Path, boot: Path) -> RafsInstance:
    config = NydusdConfig.from_dict(localfs_config(tmp_path / "blobs", tmp_path / "cache"))
    return RafsInstance(str(boot), config, decoders=DECODERS)


def read(inst: RafsInstance, path: str) -> bytes:
    nid = inst.lookup_path(path)
    return inst.read(nid, 0, inst.inode(nid).size)


def test_footer_both_layouts_and_plain_gzip() -> None:
    assert parse_footer(b"x" * 100 + footer(1234)).toc_offset == 1234
    legacy = parse_footer(b"x" * 100 + footer(0x174F733, legacy=True))
    assert (legacy.toc_offset, legacy.size) == (0x174F733, 47)
    import gzip

    with pytest.raises(TocError, match="footer"):
        parse_footer(gzip.compress(b"a plain layer" * 100))
    with pytest.raises(TocError, match="beyond the blob"):
        parse_footer(footer(10_000), blob_size=200)
    with pytest.raises(TocError):
        parse_footer(footer(1234)[:-3])  # truncated


def test_layer_reads_like_its_tar(tmp_path: Path) -> None:
    """Every file, link, device, xattr and marker as the tar unpacks it; contents through the
    decoder equal the tar's, multi-chunk file included."""
    blob, _ = write_estargz(ITEMS)
    boot, _, built = layer(tmp_path, blob)
    assert built.chunk_size == 4 << 20
    tar = unpacked(blob)
    inst = instance(tmp_path, boot)
    try:
        for it in ITEMS:
            if it.kind == "reg" and ".wh." not in it.name:
                assert read(inst, it.name) == it.data, it.name
        assert read(inst, "stargz.index.json") == _member(blob)
        assert "stargz.index.json" in tar
        ino = inst.inode(inst.lookup_path("data/big.bin"))
        assert (ino.mode & 0o7777, ino.uid, ino.gid, ino.size) == (0o600, 1000, 1000, len(BIG))
        tool = inst.lookup_path("bin/tool")
        assert inst.lookup_path("bin/tool-link") == tool and inst.inode(tool).nlink == 2
        assert inst.readlink(inst.lookup_path("bin/sh")) == b"tool"
        null = inst.inode(inst.lookup_path("dev/null"))
        assert stat.S_ISCHR(null.mode) and decode_rdev(null.u) == (1, 3)
        assert stat.S_ISBLK(inst.inode(inst.lookup_path("dev/loop0")).mode)
        assert stat.S_ISFIFO(inst.inode(inst.lookup_path("dev/pipe")).mode)
        assert inst.xattrs(inst.lookup_path("data/a.txt"))[b"user.k"] == b"v\x00\xff"
        assert inst.lookup_path("etc/.wh.gone") and inst.lookup_path(
            "opaque/.wh..wh..opq"
        )  # OCI markers kept
    finally:
        inst.close()


def _member(blob: bytes) -> bytes:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        f = tf.extractfile("stargz.index.json")
        assert f is not None
        return f.read()


def test_shared_members_use_the_inner_offset(tmp_path: Path) -> None:
    """Small payloads packed in one member (``innerOffset``, as --estargz-min-chunk-size writes)."""
    items = [Item(f"f{i}", data=os.urandom(100 + i * 37)) for i in range(20)]
    blob, toc = write_estargz(items, share_small=1 << 20)
    inner = [e.get("innerOffset", 0) for e in json.loads(toc)["entries"]]
    assert sum(1 for v in inner if v) >= 19, "the writer must have shared members"
    boot, _, _ = layer(tmp_path, blob)
    inst = instance(tmp_path, boot)
    try:
        for it in items:
            assert read(inst, it.name) == it.data
    finally:
        inst.close()


def test_flipped_byte_is_eio_and_nothing_cached(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    blob, toc = write_estargz([Item("payload", data=data), Item("other", data=b"o" * 3000)])
    boot, blob_id, _ = layer(tmp_path, blob)
    entry = next(e for e in json.loads(toc)["entries"] if e["name"] == "payload")
    path = tmp_path / "blobs" / blob_id
    bad = bytearray(blob)
    bad[entry["offset"] + 5000] ^= 0x40
    path.write_bytes(bytes(bad))
    inst = instance(tmp_path, boot)
    try:
        with pytest.raises(CacheError) as exc:
            read(inst, "payload")
        assert exc.value.errno == 5 and blob_id in str(exc.value)
        assert not any(c.map.is_ready(0) for c in inst.caches)
        assert read(inst, "other") == b"o" * 3000
        path.write_bytes(blob)  # the fault is gone: the same read succeeds
        assert read(inst, "payload") == data
    finally:
        inst.close()


def test_toc_digest_and_missing_chunk_digests(tmp_path: Path) -> None:
    blob, toc = write_estargz(ITEMS[:3])
    f = parse_footer(blob, len(blob))
    toc_file = read_toc_member(blob[f.toc_offset : len(blob) - f.size])
    assert toc_file.json_bytes == toc and toc_file.digest == "sha256:" + hashlib.sha256(toc).hexdigest()
    nodigest, _ = write_estargz([Item("big", data=os.urandom(5 << 20))], omit_chunk_digests=True)
    with pytest.raises(TocError, match="no chunkDigest"):
        layer(tmp_path, nodigest)


def test_prefetch_landmark_orders_the_prefetch_table(tmp_path: Path) -> None:
    items = [
        Item("usr/", "dir"),
        Item("usr/first", data=b"1" * 9000),
        Item("usr/second", data=b"2" * 10),
        Item("usr/later", data=b"3" * 100),
    ]
    blob, _ = write_estargz(items, landmark_after=3)
    _, _, built = layer(tmp_path, blob)
    assert built.prefetch == ("/usr/first", "/usr/second")
    plain, _ = write_estargz(items)
    assert layer(tmp_path, plain, "l2")[2].prefetch == ()


def test_upstream_fixture_toc(tmp_path: Path) -> None:
    """The upstream TOC (a hardlink, a landmark, mode with type bits) converts; its offsets and
    digests land in the chunk table as written."""
    doc = (FIXTURE / "estargz_sample.json").read_bytes()
    toc = parse_toc(doc)
    from nydus_stargz.toc import TocFile

    built = build_layer(
        toc, TocFile(doc, 512, 0o644, 0, 0, 0), blob_id="ab" * 32, blob_size=2_000_000, toc_offset=1_500_000
    )
    bs = Bootstrap(built.bootstrap)
    offsets = sorted(c.compressed_offset for c in bs.chunks)
    assert offsets[:3] == [126, 512427, 886633]
    assert built.prefetch == ("/bin/busybox", "/lib/ld-musl-x86_64.so.1")
    busybox = next(c for c in bs.chunks if c.compressed_offset == 126)
    assert busybox.compressed_size == 512427 - 126 and busybox.uncompressed_size == 833104
    assert busybox.digest.hex() == "8b7c559b8cccca0d30d01bc4b5dc944766208a53d18a03aa8afe97252207521f"


@pytest.mark.parametrize("keep_markers", [False, True], ids=["alone", "over-plain-layers"])
def test_layers_merge_with_whiteouts(tmp_path: Path, keep_markers: bool) -> None:
    """Two eStargz layers merged as a container sees them: the upper's whiteout hides a lower
    file, its opaque dir hides the lower's entries. Over plain layers (`keep_markers`) the
    merged image keeps them as overlayfs whiteouts and opaque dirs for the layers beneath."""
    low, _ = write_estargz(
        [Item("keep", data=b"k"), Item("gone", data=b"g"), Item("d/", "dir"), Item("d/old", data=b"old")]
    )
    up, _ = write_estargz(
        [
            Item(".wh.gone", data=b""),
            Item(".wh.elsewhere", data=b""),
            Item("d/", "dir"),
            Item("d/.wh..wh..opq", data=b""),
            Item("d/new", data=b"new"),
        ]
    )
    b1, _, _ = layer(tmp_path, low, "low")
    b2, _, _ = layer(tmp_path, up, "up")
    merged = merge_bootstraps(
        [Bootstrap.open(b1), Bootstrap.open(b2)], whiteout_spec="overlayfs", keep_markers=keep_markers
    )
    (tmp_path / "m.boot").write_bytes(merged.bootstrap)
    inst = instance(tmp_path, tmp_path / "m.boot")
    try:
        assert read(inst, "keep") == b"k" and read(inst, "d/new") == b"new"
        with pytest.raises(FileNotFoundError):
            inst.lookup_path("d/old")
        opaque = inst.xattrs(inst.lookup_path("d")).get(b"trusted.overlay.opaque")
        if keep_markers:
            for name in ("gone", "elsewhere"):
                ino = inst.inode(inst.lookup_path(name))
                assert stat.S_ISCHR(ino.mode) and decode_rdev(ino.u) == (0, 0), name  # overlayfs whiteouts
            assert opaque == b"y"
        else:
            for name in ("gone", "elsewhere"):
                with pytest.raises(FileNotFoundError):
                    inst.lookup_path(name)
            assert opaque is None
    finally:
        inst.close()
