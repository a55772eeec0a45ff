"""The tree model from tars: PAX, long names, hardlinks, devices, markers, hostile entries, merge."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.tree import (
    Kind,
    link_counts,
    merge_layers,
    tree_from_dir,
    tree_from_tar,
    walk,
    write_tar,
)


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def ti(name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_pax_long_names_xattrs_devices(tmp_path: Path) -> None:
    long = "d" * 150 + "/" + "f" * 200
    rich = ti("file", mode=0o4755, uid=100000, gid=200000, mtime=1000)
    rich.pax_headers = {"SCHILY.xattr.user.k": "v", "mtime": "1000.123456789"}
    tar = make_tar(tmp_path / "t.tar", [
        (ti("d" * 150, tarfile.DIRTYPE), None),
        (ti(long), b"long"),
        (rich, b"data"),
        (ti("hl", tarfile.LNKTYPE, linkname="file"), None),
        (ti("dev", tarfile.CHRTYPE, devmajor=4, devminor=300), None),
        (ti("blk", tarfile.BLKTYPE, devmajor=8, devminor=1), None),
        (ti("fifo", tarfile.FIFOTYPE), None),
        (ti("sym", tarfile.SYMTYPE, linkname="/abs/target"), None),
        (ti("implicit/parent/x"), b"x"),
    ])  # fmt: skip
    root = tree_from_tar(tar)
    paths = {p: n for p, n in walk(root)}
    assert paths[long.encode()].size == 4
    f = paths[b"file"]
    assert (f.mode, f.uid, f.gid, f.mtime, f.mtime_nsec) == (0o4755, 100000, 200000, 1000, 123456789)
    assert f.xattrs == {b"user.k": b"v"}
    assert paths[b"hl"] is f and link_counts(root)[id(f)] == 2
    assert paths[b"dev"].rdev == (4, 300) and paths[b"blk"].kind is Kind.BLOCK
    assert paths[b"sym"].link_target == b"/abs/target"
    assert paths[b"implicit/parent"].is_dir
    assert f.content is not None and f.content.open().read() == b"data"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(ti("../evil"), b"x")], "escapes the root"),
        ([(ti("a/../../evil"), b"x")], "escapes the root"),
        ([(ti("/etc/passwd"), b"x")], "absolute path"),
        ([(ti("link", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)], "escapes the root"),
        ([(ti("link", tarfile.LNKTYPE, linkname="/etc/shadow"), None)], "absolute path"),
        ([(ti("link", tarfile.LNKTYPE, linkname="missing"), None)], "not an earlier entry"),
        ([(ti("s", tarfile.SYMTYPE, linkname="/etc"), None), (ti("s/passwd"), b"x")], "not a directory"),
        (
            [(ti("d", tarfile.DIRTYPE), None), (ti("h", tarfile.LNKTYPE, linkname="d"), None)],
            "hardlink to a directory",
        ),
    ],
)
def test_hostile_entries_are_refused(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
                                     message: str) -> None:  # fmt: skip
    tar = make_tar(tmp_path / "evil.tar", members)
    with pytest.raises(RafsError, match=message):
        tree_from_tar(tar)


def test_garbage_and_truncated_tar(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar" * 100)
    with pytest.raises(RafsError, match="tar"):
        tree_from_tar(bad)
    good = make_tar(tmp_path / "g.tar", [(ti("f"), b"x" * 5000)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:2048])
    with pytest.raises(RafsError, match="unexpected end of data"):
        tree_from_tar(cut)


def test_whiteouts_opaque_and_merge(tmp_path: Path) -> None:
    lower = make_tar(tmp_path / "l.tar", [
        (ti("a", tarfile.DIRTYPE), None), (ti("a/x"), b"x"), (ti("a/y"), b"y"),
        (ti("o", tarfile.DIRTYPE), None), (ti("o/old"), b"old"), (ti("gone"), b"g"),
        (ti("keep"), b"k"),
    ])  # fmt: skip
    upper = make_tar(tmp_path / "u.tar", [
        (ti("a", tarfile.DIRTYPE), None), (ti("a/.wh.x"), b""), (ti("a/z"), b"z"),
        (ti("o", tarfile.DIRTYPE), None), (ti("o/.wh..wh..opq"), b""), (ti("o/new"), b"new"),
        (ti(".wh.gone"), b""),
    ])  # fmt: skip
    up = tree_from_tar(upper)
    assert set(up.entries[b"a"].whiteouts) == {b"x"} and up.entries[b"o"].opaque is not None
    merged = merge_layers([tree_from_tar(lower), up])
    assert sorted(p for p, _ in walk(merged)) == [b"", b"a", b"a/y", b"a/z", b"keep", b"o", b"o/new"]
    # markers survive a tar round trip
    buf = io.BytesIO()
    write_tar(up, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        names = tf.getnames()
    assert "a/.wh.x" in names and "o/.wh..wh..opq" in names and ".wh.gone" in names


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz"])
def test_compressed_layers_read_like_the_plain_tar(tmp_path: Path, kind: str) -> None:
    import gzip
    import lzma

    import zstandard

    data = {f"d/f{i}": bytes([i]) * (i * 1000) for i in range(1, 20)}
    plain = make_tar(tmp_path / "p.tar", [(ti(n), d) for n, d in data.items()])
    raw = plain.read_bytes()
    packed = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "xz": lzma.compress}[kind](
        raw
    )
    comp = tmp_path / f"p.tar.{kind}"
    comp.write_bytes(packed)
    root = tree_from_tar(comp)
    got = {p.decode(): n.content.open().read() for p, n in walk(root) if n.content is not None}
    assert got == data
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(RafsError, match=r"cannot decompress|corrupt tar|not a readable"):
        tree_from_tar(cut)


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")
def test_overlay_upperdir_becomes_a_layer(tmp_path: Path) -> None:
    """Changes made through a real overlayfs mount, read back from its upperdir, merge to the same tree."""
    import subprocess

    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    (lower / "keep").write_bytes(b"k")
    (lower / "gone").write_bytes(b"g")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_bytes(b"o")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(mnt)], check=True)  # fmt: skip
    try:
        (mnt / "gone").unlink()
        for child in (mnt / "dir").iterdir():
            child.unlink()
        (mnt / "dir").rmdir()
        (mnt / "dir").mkdir()  # overlayfs marks the new directory opaque
        (mnt / "dir" / "new").write_bytes(b"n")
        (mnt / "added").write_bytes(b"a")
        seen = {p: (n.kind, n.size) for p, n in walk(tree_from_dir(mnt))}
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    layer = tree_from_dir(upper, markers="overlayfs")
    assert b"gone" in layer.whiteouts and layer.entries[b"dir"].opaque is not None
    merged = merge_layers([tree_from_dir(lower), layer])
    assert {p: (n.kind, n.size) for p, n in walk(merged)} == seen
    assert b"old" not in merged.entries[b"dir"].entries
