"""Where compressed chunk bytes come from: the `ChunkSource` protocol and its backends.

A source only serves byte ranges of a blob as stored (compressed); decoding and verification
are the cache's job, so a backend never has to know the chunk format.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Protocol

from nydus_core.data.cache import CacheError


class ChunkSource(Protocol):
    """Byte ranges of blobs, by blob id."""

    name: str

    def read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset` of blob `blob_id`, or an OSError."""
        ...

    def close(self) -> None: ...


# What a registry client offers (`RegistryClient.read_range(blob_id_or_digest, offset, size)`):
# exactly `size` bytes at `offset` of a blob. Positional, so parameter names need not agree.
RangeReader = Callable[[str, int, int], bytes]


class LocalFsSource:
    """nydusd's ``localfs`` backend: blob files named by their id in `blob_dir` (or one `blob_file`)."""

    name = "localfs"

    def __init__(self, blob_dir: str | None = None, blob_file: str | None = None) -> None:
        if not blob_dir and not blob_file:
            raise CacheError("localfs backend needs config.dir or config.blob_file")
        self.blob_dir = blob_dir
        self.blob_file = blob_file
        self._fds: dict[str, tuple[int, tuple[int, int]]] = {}
        self._retired: list[int] = []
        self._lock = threading.Lock()

    def path_of(self, blob_id: str) -> str:
        if self.blob_file:
            return self.blob_file
        assert self.blob_dir is not None
        if "/" in blob_id or blob_id in ("", ".", ".."):
            raise CacheError(f"invalid blob id {blob_id!r}")
        return os.path.join(self.blob_dir, blob_id)

    def _fd(self, blob_id: str) -> int:
        """An open descriptor of the blob's current file.

        The path is stat'ed on every backend read (cheap next to the read itself) so that a blob
        file replaced on disk, e.g. restored after corruption, is reopened rather than read
        through a descriptor of the old file.
        """
        path = self.path_of(blob_id)
        try:
            st = os.stat(path)
        except OSError as e:
            raise CacheError(e.errno, f"localfs backend: blob {blob_id}: {e.strerror}: {path}") from e
        with self._lock:
            cached = self._fds.get(blob_id)
            if cached is not None:
                fd, ident = cached
                if ident == (st.st_dev, st.st_ino):
                    return fd
                # Another thread may still be reading through it: retire it, close at the end.
                self._retired.append(fd)
                del self._fds[blob_id]
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CacheError(e.errno, f"localfs backend: blob {blob_id}: {e.strerror}: {path}") from e
            opened = os.fstat(fd)
            self._fds[blob_id] = (fd, (opened.st_dev, opened.st_ino))
            return fd

    def read(self, blob_id: str, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(blob_id), size, offset)
        if len(data) != size:
            raise CacheError(
                f"localfs backend: blob {blob_id}: wanted {size} bytes at {offset}, got {len(data)}"
            )
        return data

    def forget(self, blob_id: str) -> None:
        """Close a cached descriptor (the file was replaced, e.g. restored after corruption)."""
        with self._lock:
            cached = self._fds.pop(blob_id, None)
            if cached is not None:
                self._retired.append(cached[0])

    def close(self) -> None:
        with self._lock:
            fds = [fd for fd, _ in self._fds.values()] + self._retired
            self._fds, self._retired = {}, []
        for fd in fds:
            os.close(fd)


class RegistrySource:
    """Adapter over a registry client's ranged reads (the ``registry`` backend).

    Whatever the client raises becomes a `CacheError` (an OSError, EIO) naming the blob, so the
    cache and the filesystem backend see one error type for every backend.
    """

    name = "registry"

    def __init__(self, read_range: RangeReader, close: Callable[[], object] | None = None) -> None:
        self._read_range = read_range
        self._close = close

    def read(self, blob_id: str, offset: int, size: int) -> bytes:
        try:
            data = self._read_range(blob_id, offset, size)
        except CacheError:
            raise
        except Exception as e:  # the client's own error types (HTTP status, TLS, timeouts)
            raise CacheError(errno.EIO, f"registry backend: blob {blob_id} range {offset}+{size}: {e}") from e
        if len(data) != size:
            raise CacheError(
                f"registry backend: blob {blob_id}: wanted {size} bytes at {offset}, got {len(data)}"
            )
        return data

    def close(self) -> None:
        if self._close is not None:
            self._close()
