"""`nydusd-py` end to end: real kernel FUSE mounts of images built by our RAFS writer (root)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import nydusd_py, running

from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.data.rafs.bootstrap import BlobSet, Bootstrap
from nydus_core.testing.images import FIXTURES, Image, build_image, flip_byte, localfs_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and overlay mounts)")

FILES = {
    "etc/motd": b"served lazily\n",
    "etc/empty": b"",
    "usr/lib/big.bin": os.urandom((2 << 20) + 12345),
    "usr/share/doc/a/b/c/deep.txt": b"deep\n" * 1000,
    # more entries than one readdir reply holds: the kernel comes back with our offsets
    **{f"many/entry-with-a-fairly-long-name-{i:04d}": str(i).encode() for i in range(400)},
}


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nydf-", dir="/tmp"))  # short: unix socket path limit
    yield path
    umount_tree(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(root: Path) -> Image:
    return build_image(root / "img", FILES, symlinks={"etc/link": "motd", "abs": "/etc/motd"},
                       xattrs={"etc/motd": {"user.colour": "blue", "trusted.x": "y"}})  # fmt: skip


def write_config(root: Path, image: Image, name: str = "config.json", **extra: object) -> Path:
    path = root / name
    path.write_text(json.dumps(localfs_config(image.blob_dir, root / "cache", **extra)))
    return path


def test_version_prints_git_commit() -> None:
    out = subprocess.run([str(nydusd_py()), "--version"], capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("Git Commit:") for line in out.splitlines())


def test_bad_arguments_exit_nonzero(root: Path) -> None:
    argv = [str(nydusd_py()), "fuse", "--mountpoint", str(root / "m"), "--apisock", str(root / "s"),
            "--bootstrap", str(root / "b")]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode != 0 and "--config and --bootstrap go together" in r.stderr


def test_dedicated_mount_serves_the_image(root: Path, image: Image) -> None:
    cfg = write_config(root, image)
    args = ("--config", str(cfg), "--bootstrap", str(image.bootstrap), "--id", "d1")
    with running(root, *args) as (_, mnt, sock):
        found = {str(p.relative_to(mnt)) for p in mnt.rglob("*")}
        many = sorted(k.split("/")[1] for k in FILES if k.startswith("many/"))
        assert sorted(os.listdir(mnt / "many")) == many
        assert found >= set(FILES) | {"etc/link", "abs", "usr/share/doc/a/b/c"}
        for rel, data in FILES.items():
            assert (mnt / rel).read_bytes() == data, rel
        big = mnt / "usr/lib/big.bin"
        with open(big, "rb") as f:  # random access across chunk boundaries
            f.seek((1 << 20) - 7)
            assert f.read(100) == FILES["usr/lib/big.bin"][(1 << 20) - 7 : (1 << 20) + 93]
        assert os.readlink(mnt / "etc/link") == "motd" and os.readlink(mnt / "abs") == "/etc/motd"
        assert os.getxattr(mnt / "etc/motd", "user.colour") == b"blue"
        assert set(os.listxattr(mnt / "etc/motd")) == {"user.colour", "trusted.x"}
        with pytest.raises(OSError) as nodata:
            os.getxattr(mnt / "etc/motd", "user.none")
        assert nodata.value.errno == errno.ENODATA
        st = os.stat(mnt / "etc/motd")
        assert st.st_size == len(FILES["etc/motd"]) and st.st_mtime == 1_700_000_000
        assert st.st_ino != os.stat(big).st_ino and os.stat(mnt).st_ino == 1
        vfs = os.statvfs(mnt)
        assert vfs.f_bsize == 4096 and vfs.f_blocks > 0 and vfs.f_namemax == 255
        with pytest.raises(OSError) as ro:
            open(mnt / "etc/motd", "r+b")  # noqa: SIM115
        assert ro.value.errno in (errno.EROFS, errno.EACCES)
        with NydusdClient(sock) as c:
            info = c.daemon_info()
            assert (info.id, info.state) == ("d1", "RUNNING")
            assert info.version["git_commit"]
            cache = c.blobcache_metrics()
            assert cache["underlying_files"] == [str(root / "cache" / f"{image.blob_id}.blob.data")]
            assert c.metrics()["data_read"] >= len(FILES["usr/lib/big.bin"])
    # the cache outlives the daemon: a second run serves the big file without the blob
    image.blob.rename(image.blob.with_suffix(".away"))
    with running(root, "--config", str(cfg), "--bootstrap", str(image.bootstrap)) as (_, mnt, _s):
        assert (mnt / "usr/lib/big.bin").read_bytes() == FILES["usr/lib/big.bin"]


def test_overlay_with_fuse_lowerdir(root: Path, image: Image) -> None:
    cfg = write_config(root, image)
    with running(root, "--config", str(cfg), "--bootstrap", str(image.bootstrap)) as (_, mnt, _s):
        upper, work, merged = root / "upper", root / "work", root / "merged"
        for d in (upper, work, merged):
            d.mkdir()
        opts = f"lowerdir={mnt},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
        try:
            assert (merged / "etc/motd").read_bytes() == FILES["etc/motd"]
            with open(merged / "etc/motd", "ab") as f:  # copy-up from the FUSE lower dir
                f.write(b"more\n")
            assert (upper / "etc/motd").read_bytes() == FILES["etc/motd"] + b"more\n"
        finally:
            umount_tree(merged)


def test_shared_mode_mount_and_umount_by_api(root: Path, image: Image) -> None:
    second = build_image(root / "img2", {"only-in-two.txt": b"two\n"}, name="two")
    config = json.dumps(localfs_config(image.blob_dir, root / "cache"))
    config2 = json.dumps(localfs_config(second.blob_dir, root / "cache"))
    with running(root) as (_, mnt, sock), NydusdClient(sock) as c:
        assert c.state() == "RUNNING" and list(mnt.iterdir()) == []
        c.mount("snap-a", image.bootstrap, config)
        c.mount("snap-b", second.bootstrap, config2)
        assert sorted(p.name for p in mnt.iterdir()) == ["snap-a", "snap-b"]
        assert (mnt / "snap-a/etc/motd").read_bytes() == FILES["etc/motd"]
        assert (mnt / "snap-b/only-in-two.txt").read_bytes() == b"two\n"
        assert (mnt / "snap-a/usr/lib/big.bin").read_bytes() == FILES["usr/lib/big.bin"]
        assert os.stat(mnt / "snap-a").st_ino != os.stat(mnt / "snap-b").st_ino
        assert c.blobcache_metrics("snap-b")["underlying_files"] == [
            str(root / "cache" / f"{second.blob_id}.blob.data")
        ]
        assert len(c.blobcache_metrics()["underlying_files"]) == 2
        os.statvfs(mnt / "snap-a")
        c.umount("snap-a")
        assert not (mnt / "snap-a").exists()
        assert [p.name for p in mnt.iterdir()] == ["snap-b"]
        assert (mnt / "snap-b/only-in-two.txt").read_bytes() == b"two\n"
        # the same id again, now with the other image: no stale inode or page of the old one
        c.mount("snap-a", second.bootstrap, config2)
        assert sorted(p.name for p in (mnt / "snap-a").iterdir()) == ["only-in-two.txt"]
        assert (mnt / "snap-a/only-in-two.txt").read_bytes() == b"two\n"


def test_flipped_byte_is_eio_logged_never_cached_then_recovers(root: Path, image: Image) -> None:
    cfg = write_config(root, image)
    bs = Bootstrap.open(image.bootstrap)
    node = bs.erofs.lookup("usr/lib/big.bin")
    victim = bs.chunk_info(bs.file_chunks(node)[1], "big.bin")
    original = flip_byte(image.blob, victim.compressed_offset + victim.compressed_size // 3)
    want = FILES["usr/lib/big.bin"]
    with running(root, "--config", str(cfg), "--bootstrap", str(image.bootstrap)) as (_, mnt, sock):
        with open(mnt / "usr/lib/big.bin", "rb") as f:
            f.seek(1 << 20)
            with pytest.raises(OSError) as exc:
                f.read(4096)
            assert exc.value.errno == errno.EIO
            # the other chunks are fine
            f.seek(0)
            assert f.read(4096) == want[:4096]
        log = (root / "nydusd.log").read_text()
        assert f"blob {image.blob_id} chunk {victim.index}" in log and "digest" in log
        with NydusdClient(sock) as c:
            assert c.blobcache_metrics()["digest_failures"] >= 1
            assert c.metrics()["fop_errors"].get("read", 0) >= 1
        # the fault goes away: the same read now succeeds (nothing bad was cached)
        fixed = image.blob.with_suffix(".fixed")
        fixed.write_bytes(original)
        os.replace(fixed, image.blob)
        with open(mnt / "usr/lib/big.bin", "rb") as f:
            f.seek(1 << 20)
            assert f.read(4096) == want[1 << 20 : (1 << 20) + 4096]
        assert (mnt / "usr/lib/big.bin").read_bytes() == want


@pytest.mark.skipif(not (FIXTURES / "bootstrap" / "rafs-v6-2.2.boot").exists(), reason="no fixtures")
def test_upstream_fixture_mounts(root: Path) -> None:
    boot = FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"
    cfg = root / "config.json"
    cfg.write_text(json.dumps(localfs_config(FIXTURES / "blobs", root / "cache")))
    bs = Bootstrap.open(boot)
    with BlobSet.from_dir(bs, str(FIXTURES / "blobs")) as blobs:
        want = {n: blobs.read_file(bs.erofs.lookup(n)) for n in ("lib.rs", "sync_io.rs")}
    with running(root, "--config", str(cfg), "--bootstrap", str(boot)) as (_, mnt, _s):
        assert sorted(p.name for p in mnt.iterdir()) == ["lib.rs", "sync_io.rs"]
        for name, data in want.items():
            assert (mnt / name).read_bytes() == data
        assert (mnt / "lib.rs").read_bytes().startswith(b"// Copyright (C) 2020 Alibaba Cloud.")
