"""`nydus-image` end to end: create (each compressor x digester) -> check -> unpack -> same tar."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from rafs_helpers import create_with_gnu_tar, make_source_tree

from nydus_core.cli.nydus_image import main
from nydus_core.data.rafs import DigestMismatch
from nydus_core.data.rafs.blob import read_blob_ci, read_toc, verify_blob_data
from nydus_core.data.rafs.bootstrap import BlobSet, Bootstrap

FIX = Path("/work/shared/fixtures/nydus")
FIX_TAR = FIX / "tar" / "all-entry-type.tar"


def tar_entries(path: Path) -> dict[str, tuple[object, ...]]:
    """Everything a tar says about each entry, file bytes as sha256; the root entry ignored.

    Hardlinks are compared as groups: which name a writer stores first is a free choice.
    """
    out: dict[str, tuple[object, ...]] = {}
    links: dict[str, str] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            name = m.name.rstrip("/").removeprefix("./")
            if name in ("", "."):
                continue
            if m.islnk():
                links[name] = m.linkname.removeprefix("./")
                continue
            data = hashlib.sha256(tf.extractfile(m).read()).hexdigest() if m.isreg() else None  # type: ignore[union-attr]
            mode = 0o777 if m.issym() else m.mode
            mtime = m.pax_headers.get("mtime", str(int(m.mtime)))
            xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            out[name] = (m.type, mode, m.uid, m.gid, m.size if m.isreg() else 0, _ns(mtime), m.linkname,
                         m.devmajor, m.devminor, xattrs, data)  # fmt: skip
    groups: dict[str, set[str]] = {}
    for name, target in links.items():
        groups.setdefault(target, {target}).add(name)
    for target, members in groups.items():
        base = out[target]
        for member in members:
            out[member] = (*base, tuple(sorted(members)))
    return out


def _ns(mtime: str) -> int:
    sec, _, frac = mtime.partition(".")
    return int(sec) * 10**9 + int((frac + "000000000")[:9])


def rich_tar(tmp: Path) -> Path:
    big = bytes(range(256)) * 8192  # 2 MiB, repeats -> dedup within the file at 1 MiB chunks
    path = tmp / "rich.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("big", big), ("copy", big), ("odd", b"z" * 12345), ("empty", b"")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uid = len(data), 1700000000, 1000
            info.pax_headers = {"SCHILY.xattr.user.tag": name}
            tf.addfile(info, __import__("io").BytesIO(data))
    return path


@pytest.mark.parametrize("compressor", ["none", "lz4_block", "zstd"])
@pytest.mark.parametrize("digester", ["blake3", "sha256"])
@pytest.mark.parametrize("source", ["fixture", "rich", "gnu"])
def test_create_unpack_round_trip(tmp_path: Path, compressor: str, digester: str, source: str) -> None:
    if source == "gnu":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        make_source_tree(tmp_path / "src")
        src = create_with_gnu_tar(tmp_path / "src", tmp_path / "gnu.tar")
    else:
        src = FIX_TAR if source == "fixture" else rich_tar(tmp_path)
    boot, blobs, out = tmp_path / "image.boot", tmp_path / "blobs", tmp_path / "out.tar"
    if source != "fixture":  # a missing blob dir is made, as upstream makes it
        blobs.mkdir()
    assert main(["create", "--bootstrap", str(boot), "--blob-dir", str(blobs), "--compressor", compressor,
                 "--digester", digester, "--fs-version", "6", str(src)]) == 0  # fmt: skip
    (blob,) = blobs.iterdir()
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert (
        main(["check", "--bootstrap", str(boot), "--blob-dir", str(blobs), "-J", str(tmp_path / "c.json")])
        == 0
    )
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["blobs"] == [blob.name] and doc["compressor"] == compressor and doc["digester"] == digester
    assert main(["unpack", "--bootstrap", str(boot), "--blob", str(blob), "--output", str(out)]) == 0
    assert tar_entries(out) == tar_entries(src)
    bs = Bootstrap.open(boot)
    entry = bs.blobs[0]
    with open(blob, "rb") as f:  # the blob's own ci table agrees with the bootstrap's chunk table
        _, chunks = read_blob_ci(f, entry.ci_offset, entry.ci_compressed_size, entry.chunk_count)
        assert read_toc(f, expected_digest=entry.blob_toc_digest).size == entry.blob_toc_size
    table = {c.index: (c.compressed_offset, c.compressed_size, c.uncompressed_offset) for c in bs.chunks}
    assert {c.index: (c.compressed_offset, c.compressed_size, c.uncompressed_offset) for c in chunks} == table
    if source == "rich":
        assert bs.blobs[0].chunk_count == 2, "both MiB of big and all of copy are one chunk; plus odd"


def test_flipped_byte_in_our_blob_names_blob_and_chunk(tmp_path: Path) -> None:
    boot, blob = tmp_path / "b.boot", tmp_path / "blob"
    assert main(["create", "-B", str(boot), "-b", str(blob), "-c", "none", str(rich_tar(tmp_path))]) == 0
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    bs = Bootstrap.open(boot)
    blob_id = bs.blobs[0].blob_id
    with (
        BlobSet(bs, {blob_id: str(blob)}) as s,
        pytest.raises(DigestMismatch, match=f"blob {blob_id} chunk 0"),
    ):
        s.read_file(bs.erofs.lookup("big"))
    assert main(["check", "-B", str(boot), "-b", str(blob)]) == 1


def test_cli_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    boot = tmp_path / "b.boot"
    boot.write_bytes((FIX / "bootstrap" / "rafs-v6-2.2.boot").read_bytes()[:8192])
    r = subprocess.run([sys.executable, "-m", "nydus_core.cli.nydus_image", "check", "-B", str(boot)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1
    assert (r.stderr.startswith("nydus-image: error:") and "blob table" in r.stderr) or "outside" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "nydus_core.cli.nydus_image", "unpack", "-B",
                        str(FIX / "bootstrap" / "rafs-v6-2.2.boot"), "-o", str(tmp_path / "x.tar")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "give --blob" in r.stderr
    assert not (tmp_path / "x.tar").exists()


def test_inspect(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(FIX / "bootstrap" / "rafs-v6-2.2.boot")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["compressor"] == "zstd" and doc["chunks"] == 2 and doc["root_nid"] == 128


def test_failed_create_writes_nothing(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        ok = tarfile.TarInfo("ok")
        ok.size = 3
        tf.addfile(ok, __import__("io").BytesIO(b"abc"))
        bad = tarfile.TarInfo("../../etc/cron.d/x")
        bad.size = 1
        tf.addfile(bad, __import__("io").BytesIO(b"x"))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["create", "-B", str(out / "b.boot"), "-b", str(out / "blob"), str(evil)]) == 1
    assert main(["create", "-B", str(out / "b.boot"), "-D", str(out), str(evil)]) == 1
    assert list(out.iterdir()) == []


def test_check_verifies_blob_toc(tmp_path: Path) -> None:
    boot, blob = tmp_path / "b.boot", tmp_path / "blob"
    assert main(["create", "-B", str(boot), "-b", str(blob), str(rich_tar(tmp_path))]) == 0
    assert main(["check", "-B", str(boot), "-b", str(blob)]) == 0
    data = bytearray(blob.read_bytes())
    data[-600] ^= 1  # inside the ToC entries
    blob.write_bytes(bytes(data))
    assert main(["check", "-B", str(boot), "-b", str(blob)]) == 1
    data[-600] ^= 1
    data[5] ^= 1  # chunk data: the image.blob ToC digest catches it before any chunk is decoded
    blob.write_bytes(bytes(data))
    with open(blob, "rb") as f, pytest.raises(DigestMismatch, match=r"image\.blob"):
        verify_blob_data(f, read_toc(f))
