"""The kernel judges our writer: bootstraps mount as EROFS with the blob as `-o device=`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from rafs_helpers import (
    create_with_gnu_tar,
    describe_dir,
    describe_erofs,
    erofs_mount,
    extract_with_gnu_tar,
    have_root,
    make_source_tree,
)

from nydus_core.data.rafs.erofs import ErofsImage
from nydus_core.data.rafs.tree import merge_layers, tree_from_dir, tree_from_tar
from nydus_core.data.rafs.writer import BuildOptions, build

FIX_TAR = Path("/work/shared/fixtures/nydus/tar/all-entry-type.tar")

pytestmark = pytest.mark.skipif(not have_root() or shutil.which("fsck.erofs") is None,
                                reason="needs root (mount, mknod) and erofs-utils")  # fmt: skip


def write_image(tree_root: object, out: Path, **opts: object) -> tuple[Path, Path]:
    boot, blob = out / "image.boot", out / "blob"
    with open(blob, "wb") as f:
        result = build(tree_root, f, BuildOptions(compressor="none", **opts))  # type: ignore[arg-type]
    boot.write_bytes(result.bootstrap)
    return boot, blob


def fsck(boot: Path, blob: Path) -> None:
    r = subprocess.run(["fsck.erofs", f"--device={blob}", str(boot)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def mounted(boot: Path, blob: Path, mnt: Path) -> dict[str, tuple[object, ...]]:
    mnt.mkdir(exist_ok=True)
    with erofs_mount(boot, mnt, [blob]):
        return describe_dir(mnt)


def test_all_entry_type_tar_mounts_like_gnu_tar_extracts(tmp_path: Path) -> None:
    want = describe_dir(extract_with_gnu_tar(FIX_TAR, tmp_path / "x"), with_root=False)
    boot, blob = write_image(tree_from_tar(FIX_TAR), tmp_path)
    fsck(boot, blob)
    got = mounted(boot, blob, tmp_path / "mnt")
    got.pop("/")
    assert got == want
    assert got["/tar/dir1/dir3/hardlink1.txt"][9] == 4  # nlink of the hardlinked file


def test_rich_pax_tar(tmp_path: Path) -> None:
    """Device nodes, fifo, xattrs, long names, big uids, nanosecond mtimes, multi-block dirs."""
    src = tmp_path / "src"
    make_source_tree(src)
    tar = create_with_gnu_tar(src, tmp_path / "rich.tar")
    want = describe_dir(extract_with_gnu_tar(tar, tmp_path / "x"))
    boot, blob = write_image(tree_from_tar(tar), tmp_path)
    fsck(boot, blob)
    assert mounted(boot, blob, tmp_path / "mnt") == want
    # our own reader sees the same tree
    assert describe_erofs(ErofsImage(boot.read_bytes()), [blob.read_bytes()]) == want


def test_directory_source_and_small_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source_tree(src)
    boot, blob = write_image(tree_from_dir(src), tmp_path, chunk_size=64 * 1024)
    fsck(boot, blob)
    assert mounted(boot, blob, tmp_path / "mnt") == describe_dir(src)


def _layer(tmp: Path, name: str, build_fn: object) -> Path:
    d = tmp / name
    d.mkdir()
    build_fn(d)  # type: ignore[operator]
    return d


def test_merge_equals_overlayfs(tmp_path: Path) -> None:
    """Our merge of two layers == overlayfs over the two layers mounted from our own bootstraps."""

    def lower(d: Path) -> None:
        (d / "keep").write_bytes(b"lower keep")
        (d / "gone").write_bytes(b"deleted by upper")
        (d / "opq").mkdir()
        (d / "opq" / "hidden").write_bytes(b"hidden by opaque")
        (d / "dir").mkdir()
        (d / "dir" / "a").write_bytes(b"a")
        (d / "replaced").write_bytes(b"old")

    def upper(d: Path) -> None:
        (d / "dir").mkdir()
        (d / "dir" / "b").write_bytes(b"b")
        (d / "opq").mkdir()
        (d / "opq" / "new").write_bytes(b"visible")
        (d / "replaced").mkdir()
        (d / "replaced" / "inside").write_bytes(b"x")

    low_dir, up_dir = _layer(tmp_path, "low", lower), _layer(tmp_path, "up", upper)
    low_tree, up_tree = tree_from_dir(low_dir), tree_from_dir(up_dir)
    up_tree.whiteouts[b"gone"] = up_tree.copy_meta()  # what `.wh.gone` in a layer tar becomes
    up_tree.entries[b"opq"].opaque = up_tree.copy_meta()  # `.wh..wh..opq`

    images = {}
    for name, tree in (("low", low_tree), ("up", up_tree), ("merged", merge_layers([low_tree, up_tree]))):
        out = tmp_path / f"img-{name}"
        out.mkdir()
        images[name] = write_image(tree, out, whiteout_spec="overlayfs")
        fsck(*images[name])

    mnts = {n: tmp_path / f"m-{n}" for n in images}
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    for m in mnts.values():
        m.mkdir()
    with erofs_mount(images["low"][0], mnts["low"], [images["low"][1]]), \
            erofs_mount(images["up"][0], mnts["up"], [images["up"][1]]):  # fmt: skip
        opts = f"lowerdir={mnts['up']}:{mnts['low']}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(ovl)], check=True)
        try:
            seen = describe_dir(ovl)
        finally:
            subprocess.run(["umount", str(ovl)], check=True)
    merged = mounted(*images["merged"], mnts["merged"])
    assert "/gone" not in merged and "/opq/hidden" not in merged and "/replaced/inside" in merged

    def strip(desc: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
        # overlayfs reports its own nlink for merged dirs (None here) and adds no xattrs for us to compare
        return {k: v[:6] + v[7:] for k, v in desc.items()}

    assert strip(merged) == strip(seen)
