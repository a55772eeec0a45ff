"""Shared helpers for the RAFS tests: a varied source tree, kernel mounts, tree descriptions."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

MS_RDONLY = 1
_libc = ctypes.CDLL(None, use_errno=True)

Desc = dict[str, tuple[object, ...]]


def have_root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def erofs_mount(image: Path, target: Path, devices: list[Path] | None = None) -> Iterator[Path]:
    """mount(2) an EROFS image file directly (file-backed, no loop), one device= per blob."""
    opts = ",".join(f"device={d}" for d in devices or [])
    rc = _libc.mount(str(image).encode(), str(target).encode(), b"erofs", MS_RDONLY, opts.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()[-5:]
        raise OSError(err, f"mount erofs {image} failed: {os.strerror(err)}; dmesg: {dmesg}")
    try:
        yield target
    finally:
        if _libc.umount2(str(target).encode(), 0) != 0:
            _libc.umount2(str(target).encode(), 2)  # MNT_DETACH as a last resort


def make_source_tree(root: Path) -> None:
    """A directory that exercises every inode kind and layout the formats have."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello erofs\n")
    (root / "block.bin").write_bytes(bytes(range(256)) * 16)  # exactly 4096
    (root / "tail.bin").write_bytes(os.urandom(5000))
    big = os.urandom(1 << 20) + b"\0" * (1 << 20) + os.urandom(300_000)
    (root / "big.bin").write_bytes(big)
    (root / "dup1.bin").write_bytes(big[: 1 << 20])  # same chunk as big.bin's first
    (root / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o4755)
    many = root / "many"
    many.mkdir()
    for i in range(400):
        (many / f"file-with-a-rather-long-name-{i:04d}").write_bytes(str(i).encode())
    sub = root / "a" / "b" / "c"
    sub.mkdir(parents=True)
    (sub / "deep.txt").write_bytes(b"deep")
    (root / "emptydir").mkdir()
    longdir = root / ("d" * 120) / ("e" * 140)
    longdir.mkdir(parents=True)
    (longdir / ("f" * 200)).write_bytes(b"long path")
    os.symlink("small.txt", root / "link")
    os.symlink("x" * 3000, root / "longlink")
    os.symlink("/etc/passwd", root / "abslink")
    os.link(root / "small.txt", root / "a" / "hard.txt")
    os.mkfifo(root / "fifo")
    os.mknod(root / "chr", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(8, 300))
    os.mknod(root / "whiteout", 0o000 | stat.S_IFCHR, os.makedev(0, 0))
    os.chown(root / "small.txt", 1000, 1001)
    os.chown(root / "exec.sh", 70000, 70001, follow_symlinks=False)
    os.lchown(root / "link", 33, 34)
    for name in ("tail.bin", "block.bin", "empty", "exec.sh"):
        os.setxattr(root / name, "user.common", b"same-value")
    os.setxattr(root / "small.txt", "user.a", b"1")
    os.setxattr(root / "small.txt", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "a", "security.test", b"sec" * 30)
    for i, p in enumerate(sorted(root.rglob("*"))):
        t = 1_600_000_000_000_000_000 + i * 1_000_000_123
        os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))


def describe_dir(root: Path, *, nsec: bool = True, with_root: bool = True) -> Desc:
    """path -> (type, perm, uid, gid, size, mtime, xattrs, link, rdev, nlink, sha256) for a real tree."""
    out: Desc = {}
    paths = [root, *sorted(root.rglob("*"))] if with_root else sorted(root.rglob("*"))
    for p in paths:
        st = os.lstat(p)
        rel = "/" + str(p.relative_to(root)) if p != root else "/"
        rel = rel.replace("/.", "/") if rel == "/." else rel
        fmt = stat.S_IFMT(st.st_mode)
        xattrs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
        link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
        data = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None
        size = st.st_size if fmt in (stat.S_IFREG, stat.S_IFLNK) else None
        mtime = st.st_mtime_ns if nsec else st.st_mtime_ns // 1_000_000_000
        nlink = st.st_nlink if fmt != stat.S_IFDIR else None
        out[rel] = (
            fmt,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            size,
            mtime,
            xattrs,
            link,
            rdev,
            nlink,
            data,
        )
    return out


def describe_erofs(image: object, devices: list[bytes] | None = None, *, nsec: bool = True) -> Desc:
    """The same description as `describe_dir`, read through our EROFS reader."""
    from nydus_core.data.rafs.erofs import LAYOUT_CHUNK_BASED, ErofsImage

    assert isinstance(image, ErofsImage)
    out: Desc = {}
    for path, ino in image.walk():
        rel = "/" + path.decode()
        fmt = stat.S_IFMT(ino.mode)
        xattrs = {n.decode(): v for n, v in image.xattrs(ino).items()}
        link = image.readlink(ino).decode() if ino.is_lnk else None
        data = None
        if ino.is_reg:
            raw = (
                image.read_chunked(ino, devices or [])
                if ino.layout == LAYOUT_CHUNK_BASED
                else image.read_flat(ino)
            )
            data = hashlib.sha256(raw).hexdigest()
        rdev = ino.rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None
        size = ino.size if fmt in (stat.S_IFREG, stat.S_IFLNK) else None
        mtime = ino.mtime * 1_000_000_000 + ino.mtime_nsec if nsec else ino.mtime
        nlink = ino.nlink if fmt != stat.S_IFDIR else None
        perm = stat.S_IMODE(ino.mode)
        out[rel] = (fmt, perm, ino.uid, ino.gid, size, mtime, xattrs, link, rdev, nlink, data)
    return out


def extract_with_gnu_tar(tar: Path, dest: Path) -> Path:
    """The standard tool as judge: what GNU tar (as root, with xattrs) makes of a layer."""
    dest.mkdir(parents=True, exist_ok=True)
    args = ["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tar), "-C", str(dest)]
    subprocess.run(["tar", *args], check=True)
    return dest


def create_with_gnu_tar(src: Path, tar: Path) -> Path:
    """A PAX tar (nanosecond mtimes, xattrs, long names) of a directory, as GNU tar writes it."""
    args = ["--format=pax", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-cpf", str(tar)]
    subprocess.run(["tar", *args, "-C", str(src), "."], check=True)
    return tar
