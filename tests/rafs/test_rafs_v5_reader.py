"""RAFS v5 reader against upstream's repeatable-build fixture and its expected `.result` tree."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from nydus_core.cli.nydus_image import main
from nydus_core.data.rafs import DigestMismatch, RafsError
from nydus_core.data.rafs.tree import Kind, Node, walk
from nydus_core.data.rafs.v5 import RafsV5, tree_from_v5

REP = Path("/work/shared/fixtures/nydus/repeatable")
BOOT = REP / "sha256-nocompress-repeatable"
BLOB = REP / "blobs" / "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"

pytestmark = pytest.mark.skipif(not BOOT.exists(), reason="nydus fixtures not present")


def expected() -> tuple[Any, dict[str, str]]:
    """The `.result` file: `tree -J` output, then `md5sum` lines of every regular file."""
    text = (REP / "sha256-nocompress-repeatable.result").read_text()
    tree, end = json.JSONDecoder().raw_decode(text)
    md5s = {}
    for line in text[end:].strip().splitlines():
        digest, path = line.split(maxsplit=1)
        md5s[path] = digest
    return tree, md5s


def as_tree_json(name: str, node: Node) -> dict[str, Any]:
    if node.kind is Kind.SYMLINK:
        return {"type": "link", "name": name, "target": node.link_target.decode(), "contents": []}
    if node.is_dir:
        children = [as_tree_json(n.decode(), c) for n, c in sorted(node.entries.items())]
        return {"type": "directory", "name": name, "contents": children}
    return {"type": "file", "name": name}


def points_to_dir(root: Node, path: bytes, node: Node) -> bool:
    if node.kind is not Kind.SYMLINK:
        return False
    target = node.link_target
    if target.strip(b"/") == b"":
        return True
    if target.startswith(b"/"):
        return False
    parts = path.split(b"/")[:-1]
    for part in target.split(b"/"):
        if part == b"..":
            if not parts:
                return False
            parts.pop()
        elif part not in (b"", b"."):
            parts.append(part)
    here = root
    for part in parts:
        nxt = here.entries.get(part)
        if nxt is None or not nxt.is_dir:
            return False
        here = nxt
    return True


def test_tree_equals_result_json() -> None:
    want_tree, want_md5 = expected()
    image = RafsV5.open(str(BOOT))
    assert image.blob_ids == [BLOB.name]
    with open(BLOB, "rb") as blob:
        root = tree_from_v5(image, blob)
        got = [as_tree_json("", root)]
        # `tree` counts a symlink to a directory as a directory ("/" was the build host's root)
        dirs = sum(1 for p, n in walk(root) if p and (n.is_dir or points_to_dir(root, p, n)))
        files = sum(1 for p, n in walk(root) if not n.is_dir and not points_to_dir(root, p, n))
        got.append({"type": "report", "directories": dirs, "files": files})
        assert got == want_tree
        md5s = {}
        for path, node in walk(root):
            if node.kind is Kind.REG:
                assert node.content is not None
                md5s["/" + path.decode()] = hashlib.md5(node.content.open().read()).hexdigest()
    assert md5s == want_md5
    hard = image.inode(next(i for i in range(1, 60) if image.inode(i).name == b"foo" and not
                            stat.S_ISLNK(image.inode(i).mode)))  # fmt: skip
    assert hard.nlink == 3


def test_v5_unpack_cli_and_corruption(tmp_path: Path) -> None:
    out = tmp_path / "v5.tar"
    assert main(["unpack", "-B", str(BOOT), "-b", str(BLOB), "-o", str(out)]) == 0
    import tarfile

    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "normal-file-test/holefiles/head-hole-1" in names and "symlink-test/root" in names
    bad = bytearray(BLOB.read_bytes())
    image = RafsV5.open(str(BOOT))
    node = next(i for p, i in image.walk() if p == b"normal-file-test/test.sh")
    bad[node.chunks[0].compressed_offset + 5] ^= 1
    (tmp_path / "blob").write_bytes(bytes(bad))
    with open(tmp_path / "blob", "rb") as f, pytest.raises(DigestMismatch, match=BLOB.name):
        image.read_file(node, f)
    with pytest.raises(RafsError, match="outside"):
        list(RafsV5(BOOT.read_bytes()[:9000]).walk())


def test_v5_corruptions_found_by_fuzzing(tmp_path: Path) -> None:
    import struct

    raw = bytearray(BOOT.read_bytes())
    root_off = struct.unpack_from("<I", raw, 8192)[0] << 3
    loop = bytearray(raw)
    struct.pack_into("<II", loop, root_off + 92, 1, 1)  # root's only child is the root itself
    with open(BLOB, "rb") as blob, pytest.raises(RafsError, match="reached twice"):
        tree_from_v5(RafsV5(bytes(loop)), blob)
    image = RafsV5(bytes(raw))
    ino = next(i for p, i in image.walk() if p == b"normal-file-test/test.sh")
    huge = bytearray(raw)
    struct.pack_into("<Q", huge, ino.offset + 64, 1 << 50)  # i_size: would need 2^30 chunks
    with pytest.raises(RafsError, match="chunks for a"):
        list(RafsV5(bytes(huge)).walk())
