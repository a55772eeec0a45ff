"""The pyfuse3 filesystem: kernel requests -> `RafsInstance` operations.

Inode numbers are derived, never allocated: ``(slot << 40) | (nid + 2)``, where the slot is 0 for
a dedicated daemon's image and the attach number for a shared daemon's images (never reused, so
an image re-attached under the same id cannot meet the kernel's stale inodes of the old one),
and the FUSE root is 1 (the dedicated image's root, or the shared daemon's directory of images).
So the numbers depend only on the bootstraps and attach order, file handles are the inode
numbers, and readdir offsets are indexes: nothing per-open has to survive a restart.

Every handler is wrapped: an unexpected exception is logged and becomes EIO (pyfuse3 would end
its main loop on anything that is not a `FUSEError`). Data reads that may need a fetch run in
worker threads so a slow backend stalls only the readers that wait for it; reads of fully
cached ranges are answered inline (a thread hop costs more than the pread), straight from the
cache file into one reused buffer.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from nydus_core.data.rafs.erofs import Inode
from nydus_core.data.runtime.instance import RafsInstance
from nydus_core.data.runtime.state import DaemonRuntime
from nydus_fuse.daemon.journal import Journal, acquit

log = logging.getLogger(__name__)

SLOT_SHIFT = 40
NID_MASK = (1 << SLOT_SHIFT) - 1
ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 86400.0  # the image never changes under a mount
SHARED_ROOT_TIMEOUT = 1.0  # the shared root's listing changes as images come and go
READ_BUFFER = 1 << 20  # the largest request the kernel sends (max_pages 256)

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])

_ERRNO_OF: tuple[tuple[type[BaseException], int], ...] = (
    (FileNotFoundError, errno.ENOENT),
    (NotADirectoryError, errno.ENOTDIR),
    (IsADirectoryError, errno.EISDIR),
)


def guarded(op: str) -> Callable[[F], F]:
    """Turn any exception of a handler into a FUSEError (EIO unless it maps to a better errno)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def handler(self: NydusFS, *args: Any) -> Any:
            ino = args[0] if args and isinstance(args[0], int) else 0
            if self.journal is not None:
                if (op, ino) in self.poisoned:
                    log.error("%s of inode %d crashed earlier daemons: answering EIO", op, ino)
                    raise pyfuse3.FUSEError(errno.EIO)
                if (op, ino) in self.suspects:  # one at a time, so a death blames only one (journal.py)
                    async with self.suspect_lock:
                        result = await run(self, op, ino, args)
                    if (op, ino) in self.suspects:  # it ran alone and we live: innocent
                        self.suspects.discard((op, ino))
                        if self.counts_path:
                            acquit(self.counts_path, op, ino)
                    return result
            return await run(self, op, ino, args)

        async def run(self: NydusFS, op: str, ino: int, args: tuple[Any, ...]) -> Any:
            slot = self.journal.enter(op, ino) if self.journal is not None else -1
            try:
                if ino and ino == self.crash_ino and op == "read":
                    os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests only)
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:
                for kind, code in _ERRNO_OF:
                    if isinstance(e, kind):
                        raise pyfuse3.FUSEError(code) from None
                self.errors += 1
                self._count_error(op, args[0] if args and isinstance(args[0], int) else None)
                log.error("%s%r failed: %s", op, args[:3], e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                if self.journal is not None:
                    self.journal.leave(slot)

        return cast(F, handler)

    return wrap


class NydusFS(pyfuse3.Operations):
    """Read-only RAFS images over FUSE."""

    enable_writeback_cache = False

    def __init__(self, runtime: DaemonRuntime, threads: int = 4) -> None:
        super().__init__()
        self.runtime = runtime
        self.shared = runtime.shared
        self.limiter = trio.CapacityLimiter(max(1, threads))
        self.errors = 0
        self._buf = bytearray(READ_BUFFER)  # reply buffer of inline (cached) reads
        self.mounted_at = time.time_ns()
        runtime.listeners.append(self._changed)
        # Set by a supervised daemon: called by libfuse while it handles INIT (see session.py),
        # the in-flight journal and the requests it found poisonous (journal.py).
        self.init_hook: Callable[[], None] | None = None
        self.journal: Journal | None = None
        self.poisoned: set[tuple[str, int]] = set()
        self.suspects: set[tuple[str, int]] = set()
        self.counts_path = ""  # where the journal's counts live (journal.acquit), when supervised
        self.suspect_lock = trio.Lock()
        # Fault injection for the crash-loop tests: reading this inode kills the daemon.
        self.crash_ino: int | None = None

    def init(self) -> None:
        if self.init_hook is not None:
            self.init_hook()

    def _count_error(self, op: str, ino: int | None) -> None:
        """Charge an EIO to the image's ``fop_errors`` (``/api/v1/metrics``) when we know which."""
        try:
            found = self._resolve(ino) if ino is not None else None
        except pyfuse3.FUSEError:
            found = None
        if found is not None:
            found[0].fs_stats.error(op)

    # -- inode numbers ------------------------------------------------------------------------
    def ino_of_path(self, path: str) -> int:
        """The inode number of `path` in a dedicated daemon's image (for fault injection)."""
        inst = self.runtime.instances[""]
        nid = inst.root_nid
        for part in [p for p in path.split("/") if p]:
            nid = inst.lookup(nid, os.fsencode(part))
        return self._ino(inst, nid, 0)

    def _resolve(self, ino: int) -> tuple[RafsInstance, int, int] | None:
        """(instance, nid, slot) of `ino`; None for the shared daemon's synthetic root."""
        if ino == ROOT:
            if self.shared:
                return None
            inst = self.runtime.instances.get("")
            if inst is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            return inst, inst.root_nid, 0
        slot = ino >> SLOT_SHIFT
        nid = (ino & NID_MASK) - 2
        if self.shared:
            found = self.runtime.by_slot.get(slot)
            if found is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            inst = found
        else:
            inst = self.runtime.instances.get("")
            if slot != 0 or inst is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
        return inst, nid, slot

    @staticmethod
    def _ino(inst: RafsInstance, nid: int, slot: int) -> int:
        if slot == 0 and nid == inst.root_nid:
            return ROOT
        return (slot << SLOT_SHIFT) | (nid + 2)

    def _attr(self, inst: RafsInstance, node: Inode, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.u if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode) else 0
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        t = node.mtime * 1_000_000_000 + node.mtime_nsec
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.entry_timeout = SHARED_ROOT_TIMEOUT
        a.attr_timeout = SHARED_ROOT_TIMEOUT
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.runtime.instances)
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mounted_at
        return a

    def _attr_of(self, ino: int) -> pyfuse3.EntryAttributes:
        found = self._resolve(ino)
        if found is None:
            return self._root_attr()
        inst, nid, slot = found
        return self._attr(inst, inst.inode(nid), ino if ino != ROOT else self._ino(inst, nid, slot))

    def _changed(self, mount_id: str, inst: RafsInstance | None) -> None:
        """A shared daemon's image went away: drop the kernel's dentry for it.

        Off the FUSE loop's thread (the API's umount) the invalidation is synchronous, so
        ``/<id>`` is gone from the mountpoint when the umount call returns; the loop keeps
        serving meanwhile, as the call releases the GIL. On the loop's thread a synchronous call
        could wait for a request only that thread can answer, so there it is queued.
        """
        if not (self.shared and inst is None and mount_id):
            return
        name = os.fsencode(mount_id)
        try:
            if threading.current_thread() is threading.main_thread():
                pyfuse3.invalidate_entry_async(ROOT, name, ignore_enoent=True)
            else:
                pyfuse3.invalidate_entry(ROOT, name)
        except FileNotFoundError:  # the kernel never looked the image up
            pass
        except Exception as e:  # not mounted yet, or shutting down
            log.debug("invalidate /%s: %s", mount_id, e)

    # -- metadata handlers ---------------------------------------------------------------------
    @guarded("lookup")
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        found = self._resolve(parent_inode)
        if found is None:  # shared root: the images
            mid = os.fsdecode(name)
            inst = self.runtime.instances.get(mid)
            slot = self.runtime.slots.get(mid)
            if inst is None or slot is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(inst, inst.inode(inst.root_nid), self._ino(inst, inst.root_nid, slot))
        inst, nid, slot = found
        if name == b".":
            child = nid
        elif name == b"..":
            raise pyfuse3.FUSEError(errno.ENOENT)
        else:
            child = inst.lookup(nid, name)
        inst.fs_stats.hit("lookup")
        return self._attr(inst, inst.inode(child), self._ino(inst, child, slot))

    @guarded("getattr")
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr_of(inode)

    @guarded("readlink")
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        found = self._resolve(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        inst, nid, _ = found
        if not inst.inode(nid).is_lnk:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return inst.readlink(nid)

    @guarded("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        found = self._resolve(inode)
        value = None if found is None else found[0].xattrs(found[1]).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @guarded("listxattr")
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        found = self._resolve(inode)
        return [] if found is None else list(found[0].xattrs(found[1]))

    @guarded("setxattr")
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @guarded("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @guarded("statfs")
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        """Required: overlayfs refuses a lower dir whose statfs fails."""
        insts = list(self.runtime.instances.values())
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(i.total_size() for i in insts) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(i.inode_count() for i in insts) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories ---------------------------------------------------------------------------
    @guarded("opendir")
    async def opendir(self, inode: int, ctx: Any) -> int:
        found = self._resolve(inode)
        if found is not None and not found[0].inode(found[1]).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @guarded("readdir")
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        found = self._resolve(fh)
        if found is None:
            names = sorted(self.runtime.instances)
            for i in range(start_id, len(names)):
                mid = names[i]
                inst, slot = self.runtime.instances.get(mid), self.runtime.slots.get(mid)
                if inst is None or slot is None:
                    continue
                attr = self._attr(inst, inst.inode(inst.root_nid), self._ino(inst, inst.root_nid, slot))
                if not pyfuse3.readdir_reply(token, os.fsencode(mid), attr, i + 1):
                    return
            return
        inst, nid, slot = found
        entries = inst.readdir(nid)
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            attr = self._attr(inst, inst.inode(child), self._ino(inst, child, slot))
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ---------------------------------------------------------------------------------
    @guarded("open")
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        found = self._resolve(inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        inst, nid, _ = found
        if not inst.inode(nid).is_reg:
            raise pyfuse3.FUSEError(errno.EISDIR)
        with inst.fs_stats.lock:
            inst.fs_stats.nr_opens += 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @guarded("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        found = self._resolve(fh)
        if found is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        inst, nid, _ = found
        if size <= len(self._buf):
            # Safe to share one buffer: pyfuse3 sends the reply before any other handler runs
            # (there is no await between filling it and returning).
            view = inst.read_cached_into(nid, off, size, self._buf)
            if view is not None:
                return view  # type: ignore[return-value]  # pyfuse3 takes any buffer
        return await trio.to_thread.run_sync(inst.read, nid, off, size, limiter=self.limiter)

    async def release(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inode numbers are derived; nothing to free
