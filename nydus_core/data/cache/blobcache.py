"""Per-blob cache: sparse uncompressed data file + persistent chunk map, filled on demand.

Files in the cache dir, named as nydusd names them: ``<blob_id>.blob.data`` (each chunk's
uncompressed bytes at its uncompressed offset, holes elsewhere) and
``<blob_id>.blob.data.chunk_map``. A chunk is decoded and its digest checked *before* it is
written or returned; a mismatch raises `ChunkCorrupt` naming blob and chunk, and nothing is
cached, so a later read (after the fault is gone) fetches it again.

Concurrency: one fetch per chunk however many readers want it (single flight: later readers wait
on the first one's event). A miss also claims following not-yet-cached chunks that are contiguous
in the blob, up to `amplify_io` compressed bytes, so a sequential reader costs one range request
per amplification window rather than one per chunk. When the reader says which file it reads
(`read`'s `file_chunks`), the window stops `amplify_across_files` bytes after that file's end in
the blob. Measured on the Debian+python3 image (bench/startup, issue 16): 1 MiB of blind
neighbours fetched 3x the bytes the workloads read; none at all (0) cost a request per small file,
and python's many small modules made that slower still; 256 KiB past the file's end, the default,
took the next modules of a package along and was the fastest of 0, 64 KiB, 256 KiB and 1 MiB.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nydus_core.data.cache import CacheError
from nydus_core.data.cache.chunk_map import ChunkMap
from nydus_core.data.cache.source import ChunkSource
from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import digest
from nydus_core.data.rafs.bootstrap import BlobEntry, ChunkInfo
from nydus_core.records import BlobDecoder

log = logging.getLogger(__name__)

DEFAULT_AMPLIFY_IO = 1 << 20
DEFAULT_AMPLIFY_ACROSS_FILES = 256 << 10  # measured: bench/startup/results/issue16-levers
EROFS_BLOCK = 4096
MAX_GAP = 4096  # bytes between two chunks in the blob that an amplified read may skip over


class ChunkCorrupt(CacheError):
    """A chunk's bytes do not match the digest in the bootstrap; they were not cached."""


@dataclass
class CacheStats:
    """Counters for ``/api/v1/metrics/blobcache`` and ``/api/v1/metrics/backend``."""

    hits: int = 0
    misses: int = 0
    backend_reads: int = 0
    backend_bytes: int = 0
    backend_errors: int = 0
    backend_latency_us: int = 0
    digest_failures: int = 0
    prefetch_chunks: int = 0
    prefetch_bytes: int = 0
    prefetch_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


class _Flight:
    """One in-progress fetch; waiters block on `done` and then look at `error`."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


def prefetch_windows(
    cache: BlobCache, chunks: Sequence[ChunkInfo], merging_size: int
) -> list[list[ChunkInfo]]:
    """Group one blob's prefetch chunks into windows for `BlobCache.fetch_window`.

    Chunks are sorted by where they are stored; a window grows while the next chunk follows
    within `MAX_GAP` and the window stays within `merging_size` stored bytes (at least one
    chunk). Windows come back in the order the list first needs them, so the files a
    workload opens first arrive first. An image laid out for its prefetch list (``nydusify
    optimize``, ``--prefetch-patterns``) has those chunks together at the blob's start, which
    makes a few large requests; a scattered list makes more, smaller ones.
    """
    rank = {c.index: i for i, c in reversed(list(enumerate(chunks)))}
    unique = {c.index: c for c in chunks if not c.flags & 0x2}  # holes have nothing stored
    ordered = sorted(unique.values(), key=lambda c: cache.stored_range(c)[0])
    windows: list[list[ChunkInfo]] = []
    start = end = -1
    for c in ordered:
        off, size = cache.stored_range(c)
        if windows and 0 <= off - end <= MAX_GAP and off + size - start <= max(merging_size, 1):
            windows[-1].append(c)
            end = off + size
            continue
        windows.append([c])
        start, end = off, off + size
    windows.sort(key=lambda w: min(rank[c.index] for c in w))
    return windows


class BlobCache:
    """Cached, verified chunks of one blob."""

    def __init__(
        self,
        entry: BlobEntry,
        chunks: Iterable[ChunkInfo],
        source: ChunkSource,
        work_dir: str,
        *,
        amplify_io: int = DEFAULT_AMPLIFY_IO,
        amplify_across_files: int = DEFAULT_AMPLIFY_ACROSS_FILES,
        validate_on_hit: bool = False,
        stats: CacheStats | None = None,
        decoder: BlobDecoder | None = None,
    ) -> None:
        """:param decoder: turns a chunk's stored bytes into its data (`nydus_core.data.decoders`;
            the native nydus decoder by default)."""
        if decoder is None:
            from nydus_core.data.decoders import NATIVE_DECODER

            decoder = NATIVE_DECODER
        self.decoder = decoder
        self.entry = entry
        self.blob_id = entry.blob_id
        self.source = source
        self.amplify_io = max(0, amplify_io)
        self.amplify_across_files = max(0, amplify_across_files)
        self.validate_on_hit = validate_on_hit
        self.stats = stats or CacheStats()
        by_index: dict[int, ChunkInfo] = {}
        for c in chunks:
            by_index.setdefault(c.index, c)
        self.chunks = by_index
        # Blob order, for amplification: neighbours by compressed offset.
        # Where each chunk's stored bytes are (the decoder says; native: its compressed extent).
        self._ranges = {c.index: decoder.read_range(entry, c) for c in by_index.values()}
        self._order = sorted(by_index.values(), key=lambda c: self._ranges[c.index][0])
        self._pos = {c.index: i for i, c in enumerate(self._order)}
        count = max(1, entry.chunk_count, max(by_index, default=-1) + 1)
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        self.data_path = os.path.join(work_dir, f"{self.blob_id}.blob.data")
        self.map = ChunkMap(self.data_path + ".chunk_map", count)
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        span = max((c.uncompressed_offset + c.uncompressed_size for c in by_index.values()), default=0)
        # Whole EROFS blocks: the data file doubles as a kernel EROFS device, which reads the last
        # chunk's block in full (a short file there is EIO).
        span = -(-span // EROFS_BLOCK) * EROFS_BLOCK
        if os.fstat(self._fd).st_size < span:
            os.ftruncate(self._fd, span)  # sparse: only fetched chunks take space
        self._lock = threading.Lock()
        self._flights: dict[int, _Flight] = {}

    # -- reading -----------------------------------------------------------------------------
    def is_ready(self, chunk: ChunkInfo) -> bool:
        return self.map.is_ready(chunk.index)

    def read_cached(self, chunk: ChunkInfo, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of a chunk known to be ready (no fetch, no locking)."""
        return os.pread(self._fd, hi - lo, chunk.uncompressed_offset + lo)

    def read_cached_into(self, chunk: ChunkInfo, lo: int, view: memoryview) -> int:
        """Fill `view` from a ready chunk at offset `lo` (no allocation: the hot path of reads)."""
        return os.preadv(self._fd, [view], chunk.uncompressed_offset + lo)

    def will_need(self, chunk: ChunkInfo) -> None:
        """Ask the kernel to start reading a ready chunk from the cache file (sequential readers)."""
        if self.map.is_ready(chunk.index):
            os.posix_fadvise(self._fd, chunk.uncompressed_offset, chunk.uncompressed_size,
                             os.POSIX_FADV_WILLNEED)  # fmt: skip

    def read(
        self,
        chunk: ChunkInfo,
        lo: int = 0,
        hi: int | None = None,
        file_chunks: Sequence[ChunkInfo | None] | None = None,
    ) -> bytes:
        """Bytes [lo, hi) of a chunk's uncompressed data, fetching and verifying it if needed.

        :param file_chunks: the chunks of the file being read (`chunk` among them), which bound
            the amplified fetch of a miss; without them the window is `amplify_io` wide.
        """
        end = chunk.uncompressed_size if hi is None else hi
        if self.map.is_ready(chunk.index):
            self.stats.add(hits=1)
            if self.validate_on_hit:
                data = self.read_cached(chunk, 0, chunk.uncompressed_size)
                self._verify(chunk, data)
                return data[lo:end]
            return self.read_cached(chunk, lo, end)
        self.stats.add(misses=1)
        data = self.fetch(chunk, file_chunks=file_chunks)
        return data[lo:end] if (lo, end) != (0, len(data)) else data

    def fetch(
        self,
        chunk: ChunkInfo,
        *,
        prefetch: bool = False,
        file_chunks: Sequence[ChunkInfo | None] | None = None,
    ) -> bytes:
        """Make `chunk` ready and return its data (single flight, amplified; see `read`)."""
        while True:
            with self._lock:
                if self.map.is_ready(chunk.index):
                    mine = None
                    flight = None
                else:
                    flight = self._flights.get(chunk.index)
                    mine = None
                    if flight is None:
                        mine = self._claim(chunk, file_chunks)
            if flight is None and mine is None:
                return self.read_cached(chunk, 0, chunk.uncompressed_size)
            if mine is not None:
                return self._run(mine, chunk, prefetch)
            assert flight is not None
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            # ready now (or the leader's result was dropped): loop reads it from the file

    def stored_range(self, chunk: ChunkInfo) -> tuple[int, int]:
        """(offset, size) of the chunk's stored bytes in the blob."""
        return self._ranges.get(chunk.index) or self.decoder.read_range(self.entry, chunk)

    def fetch_window(self, chunks: Sequence[ChunkInfo]) -> int:
        """Make a prefetch window ready: `chunks` in blob order, nearly contiguous (see
        `prefetch_windows`), fetched in one ranged request per contiguous run of chunks that
        are neither cached nor already in flight. Failed chunks are logged and left uncached
        (a read fetches them again). Returns the number of requests made."""
        runs: list[list[tuple[ChunkInfo, _Flight]]] = []
        with self._lock:
            run: list[tuple[ChunkInfo, _Flight]] = []
            end = -1
            for c in chunks:
                if c.flags & 0x2 or self.map.is_ready(c.index) or c.index in self._flights:
                    if run:
                        runs.append(run)
                    run = []
                    continue
                off, size = self.stored_range(c)
                if run and not 0 <= off - end <= MAX_GAP:
                    runs.append(run)
                    run = []
                fl = _Flight()
                self._flights[c.index] = fl
                run.append((c, fl))
                end = off + size
            if run:
                runs.append(run)
        for claimed in runs:
            try:
                self._run(claimed, claimed[0][0], True)
            except Exception as e:  # one bad chunk must not end the prefetch of the others
                log.warning("prefetch: %s", e)
        return len(runs)

    def _claim(
        self, first: ChunkInfo, file_chunks: Sequence[ChunkInfo | None] | None
    ) -> list[tuple[ChunkInfo, _Flight]]:
        """Under the lock: register flights for `first` and the neighbours an amplified read takes."""
        claimed = [(first, _Flight())]
        self._flights[first.index] = claimed[0][1]
        start, size = self._ranges.get(first.index) or self.decoder.read_range(self.entry, first)
        end = start + size
        pos = self._pos.get(first.index)
        if pos is None or self.amplify_io <= 0:
            return claimed
        limit = start + self.amplify_io
        if file_chunks is not None:
            limit = min(limit, max(end, self._file_end(file_chunks)) + self.amplify_across_files)
        for nxt in self._order[pos + 1 :]:
            if nxt.flags & 0x2:  # hole: nothing in the blob
                continue
            nxt_off, nxt_size = self._ranges[nxt.index]
            new_end = nxt_off + nxt_size
            if nxt_off - end > MAX_GAP or new_end > limit or nxt_off < end:
                break
            if self.map.is_ready(nxt.index) or nxt.index in self._flights:
                break
            fl = _Flight()
            self._flights[nxt.index] = fl
            claimed.append((nxt, fl))
            end = new_end
        return claimed

    def _file_end(self, file_chunks: Sequence[ChunkInfo | None]) -> int:
        """Where the file's stored bytes in this blob end (its chunks here, wherever dedup put them)."""
        found = 0
        for c in file_chunks:
            if c is not None and c.blob_index == self.entry.blob_index:
                r = self._ranges.get(c.index)
                if r is not None:
                    found = max(found, r[0] + r[1])
        return found

    def _run(self, claimed: list[tuple[ChunkInfo, _Flight]], want: ChunkInfo, prefetch: bool) -> bytes:
        ranges = [self._ranges.get(c.index) or self.decoder.read_range(self.entry, c) for c, _ in claimed]
        start = ranges[0][0]
        size = ranges[-1][0] + ranges[-1][1] - start
        result: bytes | None = None
        error: BaseException | None = None
        try:
            t0 = time.monotonic()
            try:
                raw = self.source.read(self.blob_id, start, size)
            except OSError as e:
                self.stats.add(backend_errors=1)
                raise CacheError(
                    e.errno or 5, f"blob {self.blob_id} chunk {want.index}: backend read failed: {e}"
                ) from e
            self.stats.add(backend_reads=1, backend_bytes=size,
                           backend_latency_us=int((time.monotonic() - t0) * 1e6))  # fmt: skip
            written: list[tuple[ChunkInfo, _Flight, bytes]] = []
            for (chunk, flight), (roff, rsize) in zip(claimed, ranges, strict=True):
                off = roff - start
                try:
                    data = self._decode(chunk, raw[off : off + rsize])
                    os.pwrite(self._fd, data, chunk.uncompressed_offset)
                except BaseException as e:
                    flight.error = e
                    if chunk is want:
                        error = e
                    continue
                written.append((chunk, flight, data))
            if written:
                # Data first and durable (one flush for the batch), then the ready bits: a crash
                # never leaves a bit set over data that did not reach the disk.
                os.fdatasync(self._fd)
            for chunk, _, data in written:
                self.map.mark(chunk.index)
                if chunk is want:
                    result = data
                if prefetch:
                    self.stats.add(prefetch_chunks=1, prefetch_bytes=len(data))
        except BaseException as e:
            error = e
            for _, flight in claimed:
                if flight.error is None:
                    flight.error = e
        finally:
            with self._lock:
                for chunk, flight in claimed:
                    self._flights.pop(chunk.index, None)
                    flight.done.set()
        if error is not None:
            raise error
        assert result is not None
        return result

    def _decode(self, chunk: ChunkInfo, raw: bytes) -> bytes:
        try:
            data = self.decoder.decode(self.entry, chunk, raw)
            if len(data) != chunk.uncompressed_size:
                raise RafsError(f"blob {self.blob_id} chunk {chunk.index}: decoded to {len(data)} bytes, "
                                f"expected {chunk.uncompressed_size}")  # fmt: skip
        except RafsError as e:
            self.stats.add(digest_failures=1)
            self._forget_source()
            raise ChunkCorrupt(5, str(e)) from e
        self._verify(chunk, data)
        return data

    def _verify(self, chunk: ChunkInfo, data: bytes) -> None:
        got = digest(self.entry.digest_algo, data)
        if got != chunk.digest:
            self.stats.add(digest_failures=1)
            self._forget_source()
            raise ChunkCorrupt(
                5,
                f"blob {self.blob_id} chunk {chunk.index}: digest mismatch "
                f"(bootstrap {chunk.digest.hex()}, data {got.hex()}); not cached",
            )

    def _forget_source(self) -> None:
        forget = getattr(self.source, "forget", None)
        if callable(forget):
            forget(self.blob_id)  # a replaced blob file is reopened on the next read

    # -- accounting --------------------------------------------------------------------------
    def cached_bytes(self) -> int:
        return sum(c.uncompressed_size for c in self.chunks.values() if self.map.is_ready(c.index))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.map.close()
