"""`nydus-image merge` of layer bootstraps, inlined bootstraps in blobs, the prefetch table."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
from rafs_helpers import describe_dir, erofs_mount, have_root

from nydus_core.cli.nydus_image import main
from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import read_toc
from nydus_core.data.rafs.bootstrap import BlobSet, Bootstrap, bootstrap_from_blob
from nydus_core.data.rafs.tree import merge_layers, tree_from_tar
from nydus_core.data.rafs.writer import BuildOptions, build


def layer(path: Path, files: dict[str, bytes | None]) -> Path:
    """A layer tar; None makes a directory."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


LOWER = {"etc": None, "etc/os": b"lower os\n", "etc/gone": b"x", "opq": None, "opq/old": b"old",
         "big": os.urandom(3 << 20)}  # fmt: skip
UPPER = {"etc": None, "etc/.wh.gone": b"", "etc/new": b"new", "opq": None, "opq/.wh..wh..opq": b"",
         "opq/fresh": b"fresh", "big2": os.urandom(100_000)}  # fmt: skip


def create(tmp: Path, name: str, tar: Path, *extra: str) -> tuple[Path, Path]:
    blobs = tmp / "blobs"
    blobs.mkdir(exist_ok=True)
    before = set(blobs.iterdir())
    boot = tmp / f"{name}.boot"
    assert main(["create", "-B", str(boot), "-D", str(blobs), *extra, str(tar)]) == 0
    (blob,) = set(blobs.iterdir()) - before
    return boot, blob


def test_merge_layers_reads_both_blobs(tmp_path: Path) -> None:
    low_tar, up_tar = layer(tmp_path / "l.tar", LOWER), layer(tmp_path / "u.tar", UPPER)
    low_boot, low_blob = create(tmp_path, "low", low_tar)
    up_boot, up_blob = create(tmp_path, "up", up_tar)
    merged = tmp_path / "merged.boot"
    assert main(["merge", "-B", str(merged), str(low_boot), str(up_boot)]) == 0
    bs = Bootstrap.open(merged)
    assert [b.blob_id for b in bs.blobs] == [low_blob.name, up_blob.name]
    paths = {p.decode() for p, _ in bs.walk()}
    assert paths == {"", "etc", "etc/os", "etc/new", "opq", "opq/fresh", "big", "big2"}
    with BlobSet.from_dir(bs, str(tmp_path / "blobs")) as blobs:
        assert blobs.read_file(bs.erofs.lookup("big")) == LOWER["big"]
        assert blobs.read_file(bs.erofs.lookup("big2")) == UPPER["big2"]
        assert blobs.read_file(bs.erofs.lookup("etc/os")) == b"lower os\n"


@pytest.mark.skipif(not have_root(), reason="needs root for mounts")
def test_merged_bootstrap_mounts_like_the_tree_merge(tmp_path: Path) -> None:
    low_tar, up_tar = layer(tmp_path / "l.tar", LOWER), layer(tmp_path / "u.tar", UPPER)
    low_boot, low_blob = create(tmp_path, "low", low_tar, "-c", "none")
    up_boot, up_blob = create(tmp_path, "up", up_tar, "-c", "none")
    merged = tmp_path / "merged.boot"
    assert main(["merge", "-B", str(merged), str(low_boot), str(up_boot)]) == 0
    ref = tmp_path / "ref"
    ref.mkdir()
    with open(ref / "blob", "wb") as f:
        result = build(merge_layers([tree_from_tar(low_tar), tree_from_tar(up_tar)]), f,
                       BuildOptions(compressor="none"))  # fmt: skip
    (ref / "boot").write_bytes(result.bootstrap)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    m1.mkdir()
    m2.mkdir()
    with erofs_mount(merged, m1, [low_blob, up_blob]), erofs_mount(ref / "boot", m2, [ref / "blob"]):
        got, want = describe_dir(m1), describe_dir(m2)
    assert got == want
    assert "/etc/gone" not in got and "/opq/old" not in got and "/opq/fresh" in got


def test_merge_with_layer_digests_and_inline_meta(tmp_path: Path) -> None:
    low_boot, low_blob = create(tmp_path, "low", layer(tmp_path / "l.tar", LOWER), "--blob-inline-meta")
    _, up_blob = create(tmp_path, "up", layer(tmp_path / "u.tar", UPPER), "--blob-inline-meta")
    # the blob carries its own layer bootstrap, readable through the ToC
    with open(low_blob, "rb") as f:
        inner = Bootstrap(bootstrap_from_blob(f, low_blob.name))
        toc = read_toc(f)
    assert b"image.boot" in toc.entries
    assert {p for p, _ in inner.walk()} == {p for p, _ in Bootstrap.open(low_boot).walk()}
    # merge straight from the blobs, renaming blobs by their (here: sha256 of the file) layer digests
    import hashlib

    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (low_blob, up_blob)]
    sizes = [str(p.stat().st_size) for p in (low_blob, up_blob)]
    merged = tmp_path / "m.boot"
    assert main(["merge", "-B", str(merged), "--blob-digests", ",".join("sha256:" + d for d in digests),
                 "--blob-sizes", ",".join(sizes), str(low_blob), str(up_blob)]) == 0  # fmt: skip
    bs = Bootstrap.open(merged)
    assert [b.blob_id for b in bs.blobs] == digests
    assert [b.compressed_size for b in bs.blobs] == [int(s) for s in sizes]
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for d, p in zip(digests, (low_blob, up_blob), strict=True):
        shutil.copy(p, renamed / d)
    with BlobSet.from_dir(bs, str(renamed)) as blobs:
        assert blobs.read_file(bs.erofs.lookup("big")) == LOWER["big"]


def test_prefetch_table_holds_nids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar = layer(tmp_path / "l.tar", LOWER)
    monkeypatch.setattr("sys.stdin", io.StringIO("/etc/os\n/big\n"))
    boot, _ = create(tmp_path, "p", tar, "--prefetch-policy", "fs")
    bs = Bootstrap.open(boot)
    assert bs.prefetch == [bs.erofs.lookup("etc/os").nid, bs.erofs.lookup("big").nid]
    raw = boot.read_bytes()
    assert struct.unpack_from("<I", raw, bs.ext.prefetch_table_offset)[0] == bs.prefetch[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("/missing\n"))
    with pytest.raises(RafsError, match="missing"):
        build(tree_from_tar(tar), io.BytesIO(), BuildOptions(prefetch=["/missing"]))


def test_merge_refuses_mismatched_chunk_sizes(tmp_path: Path) -> None:
    a, _ = create(tmp_path, "a", layer(tmp_path / "a.tar", {"f": b"a" * 10}), "--chunk-size", "0x100000")
    b, _ = create(tmp_path, "b", layer(tmp_path / "b.tar", {"g": b"b" * 10}), "--chunk-size", "0x10000")
    assert main(["merge", "-B", str(tmp_path / "m.boot"), str(a), str(b)]) == 1
    assert not (tmp_path / "m.boot").exists()


def _first_offset(bs: Bootstrap, path: str) -> int:
    ref = bs.file_chunks(bs.erofs.lookup(path))[0]
    return bs.chunk_info(ref, path).compressed_offset


def test_prefetch_files_are_laid_out_first_in_list_order(tmp_path: Path) -> None:
    """A prefetch list orders the blob's data: named files (and files below named directories)
    first, in the list's order, the rest by path; without a list the order is by path."""
    files: dict[str, bytes | None] = {name: os.urandom(5000) for name in ("a", "d/x", "d/y", "m", "z")}
    files = {"d": None, **files}
    tar = layer(tmp_path / "l.tar", files)
    plain = build(tree_from_tar(tar), io.BytesIO(), BuildOptions())
    bs = Bootstrap(plain.bootstrap)
    by_path = sorted(["a", "d/x", "d/y", "m", "z"], key=lambda p: _first_offset(bs, p))
    assert by_path == ["a", "d/x", "d/y", "m", "z"]

    blob = io.BytesIO()
    ordered = build(tree_from_tar(tar), blob, BuildOptions(prefetch=["/z", "/d", "/missing"],
                                                           prefetch_skip_missing=True))  # fmt: skip
    bs = Bootstrap(ordered.bootstrap)
    laid_out = sorted(["a", "d/x", "d/y", "m", "z"], key=lambda p: _first_offset(bs, p))
    assert laid_out == ["z", "d/x", "d/y", "a", "m"]
    assert bs.prefetch == [bs.erofs.lookup("z").nid, bs.erofs.lookup("d").nid]
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    assert ordered.blob is not None
    (blob_dir / ordered.blob.blob_id).write_bytes(blob.getvalue())
    with BlobSet.from_dir(bs, str(blob_dir)) as blobs:  # the data is still each file's own
        for name, data in files.items():
            if data is not None:
                assert blobs.read_file(bs.erofs.lookup(name)) == data
