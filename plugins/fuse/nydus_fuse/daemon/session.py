"""A FUSE session that can outlive its daemon: mount by hand, keep the INIT, replay it into pyfuse3.

Why by hand: pyfuse3 neither exposes its ``/dev/fuse`` fd nor lets a new libfuse session accept a
connection whose INIT was answered by someone else (a fresh session answers every request but
INIT with EIO). So the daemon opens ``/dev/fuse`` and calls mount(2) itself, reads the kernel's
INIT request before anyone answers it, and hands libfuse a pipe holding those bytes as its
"device". libfuse reads the INIT from the pipe and calls ``Operations.init`` *before* replying; at
that moment `ReplaySession.on_init` swaps the pipe for the real device with ``dup2`` (so the reply
and all later requests go to the kernel) and, on a takeover, sends ``FUSE_NOTIFY_RESEND`` so that
requests the dead daemon had read but not answered are queued again. On a first start the INIT
reply completes the kernel's pending INIT; on a takeover the kernel answers ENOENT to the stale
unique and libfuse ignores it. Every daemon generation runs the same path.

This relies on libfuse 3.14 internals (no splice before INIT; plain ``read()`` after it because
pyfuse3 defines no ``write_buf``): re-check when libfuse or pyfuse3 changes. Measured recipe:
``shared/reference/fuse-failover.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
INIT_READ_SIZE = (1 << 20) + 8192

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def fuse_mounted(mountpoint: str) -> bool:
    """Whether a FUSE filesystem is mounted at `mountpoint` (read from mountinfo: never touches it,
    because a mount whose daemon is dead blocks every access until someone serves it)."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if (
                len(fields) > 4
                and fields[4] == target
                and right.split()[:1]
                and right.split()[0].startswith("fuse")
            ):
                return True
    return False


def mount_fuse(mountpoint: str, fsname: str = "nydusfs", subtype: str = "nydus") -> tuple[int, bytes]:
    """Mount a read-only FUSE filesystem at `mountpoint`; returns the device fd and the kernel's INIT.

    The INIT request is read and left unanswered: `ReplaySession` answers it.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
        _check(
            _libc.mount(
                fsname.encode(),
                os.fsencode(mountpoint),
                f"fuse.{subtype}".encode(),
                ctypes.c_ulong(MS_RDONLY | MS_NOSUID | MS_NODEV),
                data.encode(),
            ),
            f"mount fuse at {mountpoint}",
        )
        init = os.read(fd, INIT_READ_SIZE)
    except BaseException:
        os.close(fd)
        raise
    if len(init) < 40 or struct.unpack_from("<I", init, 4)[0] != FUSE_INIT:
        os.close(fd)
        raise OSError(errno.EPROTO, f"first FUSE request at {mountpoint} is not INIT")
    return fd, init


def unmount(mountpoint: str) -> None:
    """Unmount (lazily if busy); a mount that is already gone is fine."""
    if _libc.umount2(os.fsencode(mountpoint), 0) == 0:
        return
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOENT):
        return
    _check(_libc.umount2(os.fsencode(mountpoint), MNT_DETACH), f"umount {mountpoint}")


def init_info(init: bytes) -> dict[str, int]:
    """The negotiated fields of a saved INIT request (for logs and the state document)."""
    major, minor, readahead, flags = struct.unpack_from("<IIII", init, 40)
    flags2 = struct.unpack_from("<I", init, 56)[0] if len(init) >= 60 else 0
    return {"major": major, "minor": minor, "max_readahead": readahead, "flags": flags, "flags2": flags2}


class ReplaySession:
    """Feeds a saved INIT to libfuse through a pipe; `on_init` switches libfuse to the real device."""

    def __init__(self, fuse_fd: int, init: bytes, *, resend: bool) -> None:
        self.fuse_fd = fuse_fd
        self.resend = resend
        r, w = os.pipe()
        try:
            os.write(w, init)
        finally:
            os.close(w)
        self.pipe_fd = r

    @property
    def device_path(self) -> str:
        return f"/dev/fd/{self.pipe_fd}"

    def on_init(self) -> None:
        """Called by libfuse inside its INIT handling, before the reply is written."""
        os.dup2(self.fuse_fd, self.pipe_fd)
        if self.resend:
            send_resend(self.fuse_fd)

    def close(self) -> None:
        """Close our copy of the device (libfuse closed `pipe_fd`, its own, in ``pyfuse3.close``)."""
        with contextlib.suppress(OSError):
            os.close(self.fuse_fd)


def send_resend(fuse_fd: int) -> None:
    """``FUSE_NOTIFY_RESEND``: the kernel re-queues every request it had handed out and not got
    an answer for (kernel >= 6.9). An older kernel answers an error, which is logged."""
    try:
        os.write(fuse_fd, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))
        log.info("sent FUSE_NOTIFY_RESEND")
    except OSError as e:
        log.warning("FUSE_NOTIFY_RESEND failed (%s): requests in flight at the takeover stay pending", e)
