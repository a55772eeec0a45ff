"""A RAFS instance: one bootstrap, its blobs behind the blob cache, inode-level operations.

Inodes are named by their EROFS nid, which is a pure function of the bootstrap: a restarted or
taken-over daemon hands the kernel the same numbers (fuse-failover.md). Backends map nids to
their own inode numbers. Metadata comes from the in-memory bootstrap; only file data goes
through the cache, and only the chunks a read overlaps are fetched.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nydus_core.data.cache.blobcache import BlobCache, CacheStats, prefetch_windows
from nydus_core.data.cache.source import ChunkSource
from nydus_core.data.decoders import DecoderSet
from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.bootstrap import CHUNK_FLAG_HOLE, Bootstrap, ChunkInfo
from nydus_core.data.rafs.erofs import LAYOUT_CHUNK_BASED, NULL_ADDR, Inode
from nydus_core.data.runtime.nydusd_json import NydusdConfig, RegistryFactory, make_source

log = logging.getLogger(__name__)

SEQUENTIAL_HINT = 128 << 10  # reads this large are (kernel) readahead: a sequential reader


@dataclass
class FsStats:
    """Counters behind ``/api/v1/metrics``."""

    data_read: int = 0
    nr_opens: int = 0
    fop_hits: dict[str, int] = field(default_factory=dict)
    fop_errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hit(self, op: str, nbytes: int = 0) -> None:
        with self.lock:
            self.fop_hits[op] = self.fop_hits.get(op, 0) + 1
            self.data_read += nbytes

    def error(self, op: str) -> None:
        with self.lock:
            self.fop_errors[op] = self.fop_errors.get(op, 0) + 1


class RafsInstance:
    """Serves one image from its bootstrap and blob cache."""

    def __init__(
        self,
        bootstrap_path: str,
        config: NydusdConfig,
        *,
        source: ChunkSource | None = None,
        registry_factory: RegistryFactory | None = None,
        prefetch_files: Iterable[str] = (),
        decoders: DecoderSet | None = None,
    ) -> None:
        """:param decoders: the blob decoders of the daemon (native nydus chunks only when
            ``None``); each blob is read by the one `DecoderSet.for_blob` picks."""
        decoders = decoders or DecoderSet.native_only()
        self.bootstrap_path = bootstrap_path
        self.config = config
        self.bootstrap = Bootstrap.open(bootstrap_path)
        self.erofs = self.bootstrap.erofs
        self.chunk_size = self.bootstrap.ext.chunk_size
        self.root_nid = self.erofs.sb.root_nid
        self.source = source or make_source(config, registry_factory)
        self.cache_stats = CacheStats()
        self.fs_stats = FsStats()
        by_blob: dict[int, list[ChunkInfo]] = {}
        for c in self.bootstrap.chunks:
            by_blob.setdefault(c.blob_index, []).append(c)
        self.caches = [
            BlobCache(entry, by_blob.get(i, []), self.source, config.work_dir, amplify_io=config.amplify_io,
                      amplify_across_files=config.amplify_across_files,
                      validate_on_hit=config.digest_validate, stats=self.cache_stats,
                      decoder=decoders.for_blob(entry))
            for i, entry in enumerate(self.bootstrap.blobs)
        ]
        self._inodes: dict[int, Inode] = {}
        self._dirs: dict[int, dict[bytes, int]] = {}
        self._dir_lists: dict[int, list[tuple[bytes, int]]] = {}
        self._file_chunks: dict[int, list[ChunkInfo | None]] = {}
        self._flat: dict[int, bytes] = {}
        self._xattrs: dict[int, dict[bytes, bytes]] = {}
        self._meta_lock = threading.Lock()
        self._stop = threading.Event()
        self._prefetch_threads: list[threading.Thread] = []
        self.prefetch_files = list(prefetch_files)

    # -- metadata ----------------------------------------------------------------------------
    def inode(self, nid: int) -> Inode:
        node = self._inodes.get(nid)
        if node is None:
            node = self.erofs.inode(nid)
            self._inodes[nid] = node
        return node

    def _entries(self, nid: int) -> dict[bytes, int]:
        table = self._dirs.get(nid)
        if table is None:
            listing = [(d.name, d.nid) for d in self.erofs.children(self.inode(nid))]
            table = dict(listing)
            with self._meta_lock:
                self._dir_lists[nid] = listing
                self._dirs[nid] = table
        return table

    def lookup(self, parent_nid: int, name: bytes) -> int:
        """nid of `name` in directory `parent_nid`; FileNotFoundError when there is none."""
        if not self.inode(parent_nid).is_dir:
            raise NotADirectoryError(f"nid {parent_nid} is not a directory")
        nid = self._entries(parent_nid).get(name)
        if nid is None:
            raise FileNotFoundError(name.decode(errors="replace"))
        return nid

    def readdir(self, nid: int) -> list[tuple[bytes, int]]:
        """(name, nid) of every entry but "." and "..", in on-disk (sorted) order."""
        if not self.inode(nid).is_dir:
            raise NotADirectoryError(f"nid {nid} is not a directory")
        self._entries(nid)
        return self._dir_lists[nid]

    def readlink(self, nid: int) -> bytes:
        return self.erofs.readlink(self.inode(nid))

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        table = self._xattrs.get(nid)
        if table is None:
            table = self.erofs.xattrs(self.inode(nid))
            self._xattrs[nid] = table
        return table

    def lookup_path(self, path: str) -> int:
        nid = self.root_nid
        for part in [p for p in path.encode().split(b"/") if p]:
            nid = self.lookup(nid, part)
        return nid

    # -- data --------------------------------------------------------------------------------
    def _chunks(self, node: Inode) -> list[ChunkInfo | None]:
        found = self._file_chunks.get(node.nid)
        if found is None:
            bs = self.bootstrap
            found = []
            for ref in bs.file_chunks(node):
                info = bs.chunk_map.get((ref.blob_index, ref.ci_index))
                if info is None and ref.blkaddr != NULL_ADDR:
                    raise RafsError(f"nid {node.nid}: chunk (blob {ref.blob_index}, index {ref.ci_index}) "
                                    "is not in the chunk table")  # fmt: skip
                found.append(None if info is None or info.flags & CHUNK_FLAG_HOLE else info)
            self._file_chunks[node.nid] = found
        return found

    def _regular(self, nid: int) -> Inode:
        node = self.inode(nid)
        if not node.is_reg:
            raise IsADirectoryError(f"nid {nid} is not a regular file")
        return node

    def read(self, nid: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of regular file `nid` (short at EOF), fetched as needed."""
        return self._read(nid, offset, size, cached_only=False) or b""

    def read_if_cached(self, nid: int, offset: int, size: int) -> bytes | None:
        """Like `read`, but None when any needed chunk is not cached yet (never blocks on I/O)."""
        return self._read(nid, offset, size, cached_only=True)

    def read_cached_into(self, nid: int, offset: int, size: int, buf: bytearray) -> memoryview | None:
        """Fill `buf` with `size` file bytes from `offset` when all needed chunks are cached, else None.

        The returned view (short at EOF) aliases `buf`; the caller must use it before the next
        call. This avoids a fresh 1 MiB bytes object (and its page faults) per request.
        """
        node = self._regular(nid)
        if size > len(buf):
            raise ValueError(f"read of {size} bytes into a {len(buf)}-byte buffer")
        end = min(node.size, offset + size)
        if offset >= end:
            return memoryview(buf)[:0]
        if node.layout != LAYOUT_CHUNK_BASED:
            return None
        cs = self.chunk_size
        chunks = self._chunks(node)
        first, last = offset // cs, (end - 1) // cs
        for i in range(first, last + 1):
            info = chunks[i]
            if info is not None and not self.caches[info.blob_index].map.is_ready(info.index):
                return None
        view = memoryview(buf)
        pos = 0
        for i in range(first, last + 1):
            base = i * cs
            lo, hi = max(offset - base, 0), min(end - base, cs)
            info = chunks[i]
            part = view[pos : pos + hi - lo]
            if info is None:
                part[:] = bytes(hi - lo)
            elif self.caches[info.blob_index].read_cached_into(info, lo, part) != hi - lo:
                raise RafsError(f"nid {nid}: cache file of blob {self.caches[info.blob_index].blob_id} "
                                f"is shorter than chunk {info.index}")  # fmt: skip
            pos += hi - lo
        if size >= SEQUENTIAL_HINT and last + 1 < len(chunks):
            nxt = chunks[last + 1]
            if nxt is not None:  # a large read: have the next chunk on its way from disk
                self.caches[nxt.blob_index].will_need(nxt)
        self.fs_stats.hit("read", pos)
        return view[:pos]

    def _read(self, nid: int, offset: int, size: int, cached_only: bool) -> bytes | None:
        node = self._regular(nid)
        end = min(node.size, offset + size)
        if offset >= end:
            return b""
        if node.layout != LAYOUT_CHUNK_BASED:
            flat = self._flat.get(nid)
            if flat is None:
                flat = self._flat[nid] = self.erofs.read_flat(node)
            return flat[offset:end]
        cs = self.chunk_size
        chunks = self._chunks(node)
        parts: list[bytes] = []
        for i in range(offset // cs, (end - 1) // cs + 1):
            base = i * cs
            lo, hi = max(offset - base, 0), min(end - base, cs)
            info = chunks[i]
            if info is None:
                parts.append(bytes(hi - lo))
                continue
            cache = self.caches[info.blob_index]
            if cached_only:
                if not cache.map.is_ready(info.index):
                    return None
                parts.append(cache.read_cached(info, lo, hi))
            else:
                parts.append(cache.read(info, lo, hi, chunks))
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.fs_stats.hit("read", len(data))
        return data

    # -- prefetch ----------------------------------------------------------------------------
    def prefetch_targets(self) -> list[int]:
        """Files to warm, in order: the bootstrap's prefetch table, the file list, then (prefetch_all) all."""
        roots: list[int] = list(self.bootstrap.prefetch)
        for path in self.prefetch_files:
            try:
                roots.append(self.lookup_path(path))
            except (FileNotFoundError, NotADirectoryError):
                log.warning("prefetch: %s is not in the image", path)
        if self.config.prefetch.prefetch_all:
            roots.append(self.root_nid)
        seen: set[int] = set()
        files: list[int] = []
        stack = list(reversed(roots))
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            node = self.inode(nid)
            if node.is_dir:
                stack.extend(n for _, n in reversed(self.readdir(nid)))
            elif node.is_reg and node.layout == LAYOUT_CHUNK_BASED:
                files.append(nid)
        return files

    def start_prefetch(self) -> None:
        """Warm the cache in background threads when ``fs_prefetch.enable`` (or a file list) asks."""
        if not (self.config.prefetch.enable or self.prefetch_files):
            return
        try:
            files = self.prefetch_targets()
        except (RafsError, OSError) as e:
            log.warning("prefetch: cannot list targets: %s", e)
            return
        per_blob: dict[int, list[ChunkInfo]] = {}
        for nid in files:
            for info in self._chunks(self.inode(nid)):
                if info is not None:
                    per_blob.setdefault(info.blob_index, []).append(info)
        # A blob's windows in the order the list needs them, blobs interleaved: every layer's
        # first files arrive early, whichever layer they are in.
        merging = self.config.prefetch.merging_size
        plans = [[(self.caches[b], w) for w in prefetch_windows(self.caches[b], chunks, merging)]
                 for b, chunks in per_blob.items()]  # fmt: skip
        work = [step for round_ in itertools.zip_longest(*plans) for step in round_ if step is not None]
        if not work:
            return
        self.cache_stats.add(prefetch_requests=1)
        lock = threading.Lock()
        queue = iter(work)

        def worker() -> None:
            while not self._stop.is_set():
                with lock:
                    step = next(queue, None)
                if step is None:
                    return
                cache, window = step
                cache.fetch_window(window)

        for n in range(min(self.config.prefetch.threads_count, len(work))):
            t = threading.Thread(target=worker, name=f"prefetch-{n}", daemon=True)
            t.start()
            self._prefetch_threads.append(t)

    def fetch_all(self) -> None:
        """Make every chunk of every blob ready in the cache (fetched, decoded, digest-checked):
        a backend that hands the cache files to the kernel needs them complete, since the kernel
        reads holes as zeros."""
        for cache in self.caches:
            for chunk in sorted(cache.chunks.values(), key=lambda c: c.compressed_offset):
                if not chunk.flags & CHUNK_FLAG_HOLE and not cache.map.is_ready(chunk.index):
                    cache.fetch(chunk)

    def wait_prefetch(self, timeout: float | None = None) -> None:
        for t in self._prefetch_threads:
            t.join(timeout)

    # -- accounting --------------------------------------------------------------------------
    def inode_count(self) -> int:
        return max(1, self.erofs.sb.inos)

    def total_size(self) -> int:
        return sum(b.uncompressed_size for b in self.bootstrap.blobs) + len(self.bootstrap.data)

    def blobcache_metrics(self, sid: str) -> dict[str, Any]:
        s = self.cache_stats
        files = [c.data_path for c in self.caches]
        return {
            "id": sid,
            "underlying_files": files,
            "store_path": self.config.work_dir,
            "partial_hits": 0,
            "whole_hits": s.hits,
            "total": s.hits + s.misses,
            "entries_count": sum(c.map.ready_count() for c in self.caches),
            "cached_bytes": sum(c.cached_bytes() for c in self.caches),
            "prefetch_data_amount": s.prefetch_bytes,
            "prefetch_requests_count": s.prefetch_requests,
            "prefetch_mr_count": s.prefetch_chunks,
            "prefetch_unmerged_chunks": 0,
            "digest_failures": s.digest_failures,
            "data_all_ready": all(c.map.all_ready() for c in self.caches),
        }

    def backend_metrics(self, sid: str) -> dict[str, Any]:
        s = self.cache_stats
        return {
            "id": sid,
            "backend_type": self.config.backend_type,
            "read_count": s.backend_reads,
            "read_errors": s.backend_errors,
            "read_amount_total": s.backend_bytes,
            "read_cumulative_latency_millis_total": s.backend_latency_us // 1000,
        }

    def fs_metrics(self, sid: str) -> dict[str, Any]:
        f = self.fs_stats
        with f.lock:
            return {
                "id": sid,
                "files_account_enabled": False,
                "data_read": f.data_read,
                "nr_opens": f.nr_opens,
                "fop_hits": dict(f.fop_hits),
                "fop_errors": dict(f.fop_errors),
            }

    def close(self) -> None:
        self._stop.set()
        self.wait_prefetch(5.0)
        for c in self.caches:
            c.close()
        self.source.close()


def merge_counts(docs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum numeric fields (and concatenate lists) of per-instance metrics for a daemon-wide answer."""
    out: dict[str, Any] = {}
    for d in docs:
        for k, v in d.items():
            if k == "id":
                continue
            if isinstance(v, bool):
                out[k] = out.get(k, True) and v
            elif isinstance(v, int):
                out[k] = out.get(k, 0) + v
            elif isinstance(v, list):
                out.setdefault(k, []).extend(v)
            elif isinstance(v, dict):
                acc = out.setdefault(k, {})
                for kk, vv in v.items():
                    acc[kk] = acc.get(kk, 0) + vv
            else:
                out.setdefault(k, v)
    return out

