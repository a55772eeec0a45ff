"""Which files a workload opens, in order: a fanotify watch on the superblock of its root filesystem.

The workload's root is an overlay mount of its own (`workload.py`), so a filesystem-wide mark
(``FAN_MARK_FILESYSTEM``) sees exactly that container's opens, in whatever mount namespace its
copy of the mount lives, and nothing of the host's. Each event carries an open file descriptor;
its ``/proc/self/fd`` link names the file. The link of a file reached through another
namespace's mount is relative to that mount, so paths are taken below `root` when they start
with it and as they are otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_OPEN = 0x20
FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_NOFD = -1
AT_FDCWD = -100
_EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_METADATA_VERSION = 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


class TraceError(OSError):
    """The watch could not be set up (no CAP_SYS_ADMIN, a kernel without fanotify)."""


class AccessTrace:
    """Record every file opened on the filesystem mounted at `root`, first open first.

    Use as a context manager around the workload; `paths` then holds absolute paths inside the
    root (``/usr/bin/python3``), each once. A queue overflow (the kernel dropped events) is
    remembered in `overflowed`: the list is then incomplete, and callers say so."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.paths: list[str] = []
        self.overflowed = False
        self._seen: set[str] = set()
        self._fd = -1
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> AccessTrace:
        fd = _libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise TraceError(err, f"fanotify_init: {os.strerror(err)} (needs CAP_SYS_ADMIN)")
        mask = FAN_OPEN | FAN_OPEN_EXEC
        if (
            _libc.fanotify_mark(
                fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, os.fsencode(self.root)
            )
            < 0
        ):
            err = ctypes.get_errno()
            os.close(fd)
            raise TraceError(err, f"fanotify_mark {self.root}: {os.strerror(err)}")
        self._fd = fd
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._loop, name="access-trace", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join()
        self._drain()  # what arrived between the last poll and the stop
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)
        self._fd = -1

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._fd in ready:
                self._drain()
            if self._stop_r in ready:
                return

    def _drain(self) -> None:
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                return
            off = 0
            while off + _EVENT.size <= len(buf):
                length, vers, _, _, mask, fd, _pid = _EVENT.unpack_from(buf, off)
                if vers != _METADATA_VERSION or length < _EVENT.size:
                    raise TraceError(errno.EPROTO, f"fanotify: unexpected event metadata version {vers}")
                off += length
                if mask & FAN_Q_OVERFLOW:
                    self.overflowed = True
                if fd == FAN_NOFD or fd < 0:
                    continue
                try:
                    self._record(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def _record(self, link: str) -> None:
        if link.endswith(" (deleted)"):
            return
        if link == self.root or link.startswith(self.root + "/"):
            link = link[len(self.root) :] or "/"
        if link.startswith("/") and link not in self._seen:
            self._seen.add(link)
            self.paths.append(link)
