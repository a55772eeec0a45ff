"""Persistent bitmap of the chunks of one blob whose uncompressed data is in the cache file.

File layout (ours, little endian): 16-byte header ``b"NYDCMAP1"``, u32 chunk count, u32 zero,
then one bit per chunk (bit ``i % 8`` of byte ``i // 8``). The caller writes and fsyncs the chunk
data first and only then calls `mark`, so a crash can lose a "ready" bit (the chunk is fetched
again) but can never leave a bit set over data that never reached the disk.
"""

from __future__ import annotations

import os
import struct
import threading

from nydus_core.cache import CacheError

MAGIC = b"NYDCMAP1"
_HEADER = struct.Struct("<8sII")
HEADER_SIZE = _HEADER.size


class ChunkMap:
    """Ready bits of one blob's chunks, mirrored in memory and in `path`."""

    def __init__(self, path: str, chunk_count: int) -> None:
        self.path = path
        self.chunk_count = chunk_count
        self._lock = threading.Lock()
        size = (chunk_count + 7) // 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) == HEADER_SIZE:
                magic, count, _ = _HEADER.unpack(head)
                if magic != MAGIC or count != chunk_count:
                    # Not ours or for another chunk layout: nothing in it can be trusted.
                    head = b""
            if len(head) != HEADER_SIZE:
                os.ftruncate(fd, 0)
                os.pwrite(fd, _HEADER.pack(MAGIC, chunk_count, 0) + bytes(size), 0)
                os.fsync(fd)
            bits = os.pread(fd, size, HEADER_SIZE)
        except OSError:
            os.close(fd)
            raise
        if len(bits) != size:
            os.close(fd)
            raise CacheError(f"chunk map {path} is truncated ({len(bits)} of {size} bitmap bytes)")
        self._fd = fd
        self._bits = bytearray(bits)

    def is_ready(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def ready_count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def all_ready(self) -> bool:
        return self.ready_count() == self.chunk_count

    def mark(self, index: int) -> None:
        """Set chunk `index` ready, in memory and on disk (the data must already be durable)."""
        if not 0 <= index < self.chunk_count:
            raise CacheError(f"chunk map {self.path}: index {index} outside 0..{self.chunk_count - 1}")
        with self._lock:
            byte = index >> 3
            self._bits[byte] |= 1 << (index & 7)
            os.pwrite(self._fd, bytes((self._bits[byte],)), HEADER_SIZE + byte)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
