"""Unmounting what a daemon left behind: its mountpoint and anything mounted beneath it.

A dead FUSE daemon leaves a mount whose every access fails with "Transport endpoint is not
connected"; a respawned daemon cannot mount over it. We read ``/proc/self/mountinfo`` and unmount
the deepest mounts first, falling back to a lazy (``MNT_DETACH``) unmount when one is busy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[Path]:
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo") as f:
        return [Path(_unescape(line.split()[4])) for line in f if line.strip()]


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or beneath `path`, deepest (and latest) first."""
    path = Path(os.path.abspath(path))
    found = [m for m in mount_points() if m == path or path in m.parents]
    found.reverse()
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def is_mounted(path: Path) -> bool:
    return Path(os.path.abspath(path)) in mount_points()


def umount(path: Path, *, lazy_fallback: bool = True) -> None:
    """Unmount one mount point; EINVAL/ENOENT (not mounted) is fine; busy → lazy unmount."""
    target = os.fsencode(str(path))
    if _libc.umount2(target, 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if lazy_fallback and _libc.umount2(target, MNT_DETACH) == 0:
        log.warning("unmounted %s lazily (%s)", path, os.strerror(err))
        return
    err2 = ctypes.get_errno()
    if err2 in (errno.EINVAL, errno.ENOENT):
        return
    raise OSError(err2, f"umount {path}: {os.strerror(err2)}")


def umount_tree(path: Path) -> None:
    """Unmount everything at or beneath `path` (repeated: a path may be mounted several times)."""
    for _ in range(16):
        targets = mounts_under(path)
        if not targets:
            return
        for m in targets:
            umount(m)


MS_RDONLY = 1


def mount_erofs(image: Path, target: Path, devices: list[Path] | None = None) -> None:
    """mount(2) an EROFS image file read-only at `target`, file-backed (Linux 6.12+: no loop
    device), with one ``device=`` per extra device (a RAFS v6 bootstrap's blobs) in slot order.

    The kernel is the judge of the image; its refusal is an `OSError` with the kernel's last words
    (dmesg), because ``EINVAL`` alone says nothing about which superblock field it disliked.
    """
    opts = ",".join(f"device={d}" for d in devices or [])
    target.mkdir(parents=True, exist_ok=True)
    source, where = os.fsencode(str(image)), os.fsencode(str(target))
    rc = _libc.mount(source, where, b"erofs", MS_RDONLY, opts.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        tail = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout.splitlines()[-3:]
        raise OSError(err, f"mount -t erofs {image} {target} ({opts or 'no devices'}): {os.strerror(err)}; "
                           f"kernel: {' | '.join(tail)}")  # fmt: skip
