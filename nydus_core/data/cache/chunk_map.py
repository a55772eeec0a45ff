"""Persistent bitmap of the chunks of one blob whose uncompressed data is in the cache file.

The file has nydusd's layout, so nydusd and nydusd-py can share a cache directory: a 4096-byte
header (little endian u32 ``0x424D4150`` "BMAP", u32 version 1, u32 ``0x434D4150`` "CMAP", u32
all-ready latch ``0x4D4D4150`` once every chunk is ready, zeros), then one bit per chunk, most
significant bit first (chunk ``i`` is ``0x80 >> (i % 8)`` of byte ``i // 8``). The file is exactly
header + bitmap bytes long.

It is mapped shared, so daemons using the same cache dir see each other's chunks. The caller
writes and fsyncs the chunk data first and only then calls `mark`: a crash can lose a "ready"
bit (the chunk is fetched again) but never leaves a bit set over data that is not on disk.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

from nydus_core.data.cache import CacheError

MAGIC1 = 0x424D4150
MAGIC2 = 0x434D4150
MAGIC_ALL_READY = 0x4D4D4150
VERSION = 1
HEADER_SIZE = 4096
_HEAD = struct.Struct("<IIII")


def _mask(index: int) -> int:
    return 0x80 >> (index & 7)


class ChunkMap:
    """Ready bits of one blob's chunks, in a shared mapping of `path`."""

    def __init__(self, path: str, chunk_count: int) -> None:
        if chunk_count <= 0:
            raise CacheError(f"chunk map {path}: a blob has at least one chunk, not {chunk_count}")
        self.path = path
        self.chunk_count = chunk_count
        self._lock = threading.Lock()
        size = HEADER_SIZE + (chunk_count + 7) // 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not self._valid(fd, size):
                # Missing, torn, foreign or for another layout: nothing in it can be trusted.
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
                os.fsync(fd)
                os.pwrite(fd, _HEAD.pack(MAGIC1, VERSION, MAGIC2, 0), 0)
                os.fsync(fd)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._size = size
        self._not_ready = 0 if self._latched() else chunk_count - self.ready_count()

    @staticmethod
    def _valid(fd: int, size: int) -> bool:
        if os.fstat(fd).st_size != size:
            return False
        magic, version, magic2, _ = _HEAD.unpack(os.pread(fd, _HEAD.size, 0))
        return magic == MAGIC1 and version >= 1 and magic2 == MAGIC2

    def _latched(self) -> bool:
        return bool(_HEAD.unpack_from(self._mm, 0)[3] == MAGIC_ALL_READY)

    def is_ready(self, index: int) -> bool:
        return bool(self._mm[HEADER_SIZE + (index >> 3)] & _mask(index))

    def ready_count(self) -> int:
        if self._latched():
            return self.chunk_count
        bits = self._mm[HEADER_SIZE : self._size]
        return min(self.chunk_count, int.from_bytes(bits, "big").bit_count())

    def all_ready(self) -> bool:
        return self._latched() or self.ready_count() >= self.chunk_count

    def mark(self, index: int) -> None:
        """Set chunk `index` ready (its data must already be durable); latch "all ready" at the end."""
        if not 0 <= index < self.chunk_count:
            raise CacheError(f"chunk map {self.path}: index {index} outside 0..{self.chunk_count - 1}")
        with self._lock:
            pos = HEADER_SIZE + (index >> 3)
            if self._mm[pos] & _mask(index):
                return
            self._mm[pos] |= _mask(index)
            self._not_ready -= 1
            if self._not_ready <= 0 and self.ready_count() >= self.chunk_count:
                self._mm.flush()  # the bits first, then the latch that vouches for them
                struct.pack_into("<I", self._mm, 12, MAGIC_ALL_READY)
                self._mm.flush(0, mmap.PAGESIZE)

    def close(self) -> None:
        with self._lock:
            if not self._mm.closed:
                self._mm.close()
