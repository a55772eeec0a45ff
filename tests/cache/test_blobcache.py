"""The blob cache against real blobs written by our RAFS writer (files on disk, real threads)."""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from nydus_core.data.cache.blobcache import BlobCache, ChunkCorrupt, prefetch_windows
from nydus_core.data.cache.chunk_map import ChunkMap
from nydus_core.data.cache.source import LocalFsSource, RegistrySource
from nydus_core.data.rafs.bootstrap import Bootstrap, ChunkInfo
from nydus_core.testing.images import Image, build_image, flip_byte

CS = 64 * 1024


class CountingSource(LocalFsSource):
    """A localfs source that records every range it serves (and can be slowed down)."""

    def __init__(self, blob_dir: str, delay: float = 0.0) -> None:
        super().__init__(blob_dir)
        self.calls: list[tuple[int, int]] = []
        self.delay = delay
        self._calls_lock = threading.Lock()

    def read(self, blob_id: str, offset: int, size: int) -> bytes:
        with self._calls_lock:
            self.calls.append((offset, size))
        if self.delay:
            time.sleep(self.delay)
        return super().read(blob_id, offset, size)


def _image(tmp_path: Path) -> tuple[Image, Bootstrap, bytes]:
    data = os.urandom(10 * CS + 1234)
    img = build_image(tmp_path / "img", {"data.bin": data, "small.txt": b"small\n"}, chunk_size=CS)
    return img, Bootstrap.open(img.bootstrap), data


def _cache(img: Image, bs: Bootstrap, work: Path, source: object = None, **kw: object) -> BlobCache:
    src = source if source is not None else LocalFsSource(str(img.blob_dir))
    return BlobCache(bs.blobs[0], bs.chunks, src, str(work), **kw)  # type: ignore[arg-type]


def _file_chunks(bs: Bootstrap, path: str) -> list[ChunkInfo]:
    node = bs.erofs.lookup(path)
    return [bs.chunk_info(r, path) for r in bs.file_chunks(node)]


def test_read_through_cache_matches_source_and_persists(tmp_path: Path) -> None:
    img, bs, data = _image(tmp_path)
    work = tmp_path / "cache"
    cache = _cache(img, bs, work)
    chunks = _file_chunks(bs, "data.bin")
    got = b"".join(cache.read(c) for c in chunks)
    assert got == data
    assert cache.stats.misses >= 1
    data_file = work / f"{img.blob_id}.blob.data"
    assert data_file.exists() and (work / f"{img.blob_id}.blob.data.chunk_map").exists()
    assert cache.cached_bytes() >= len(data)
    cache.close()
    # a new cache (daemon restart) finds every chunk ready and never touches the backend
    src = CountingSource(str(img.blob_dir))
    again = _cache(img, bs, work, src)
    assert all(again.is_ready(c) for c in chunks)
    assert b"".join(again.read(c) for c in chunks) == data
    assert src.calls == [] and again.stats.hits == len(chunks)
    # a slice of a cached chunk comes straight from the data file
    assert again.read(chunks[3], 100, 200) == data[3 * CS + 100 : 3 * CS + 200]
    again.close()


def test_digest_mismatch_raises_names_blob_and_chunk_and_caches_nothing(tmp_path: Path) -> None:
    img, bs, data = _image(tmp_path)
    work = tmp_path / "cache"
    chunks = _file_chunks(bs, "data.bin")
    victim = chunks[2]
    original = flip_byte(img.blob, victim.compressed_offset + victim.compressed_size // 2)
    cache = _cache(img, bs, work, amplify_io=0)
    with pytest.raises(ChunkCorrupt) as exc:
        cache.read(victim)
    assert img.blob_id in str(exc.value) and f"chunk {victim.index}" in str(exc.value)
    assert not cache.is_ready(victim)
    # nothing of it reached the data file (still a hole)
    with open(work / f"{img.blob_id}.blob.data", "rb") as f:
        f.seek(victim.uncompressed_offset)
        assert f.read(victim.uncompressed_size) == bytes(victim.uncompressed_size)
    chunk_map = ChunkMap(str(work / f"{img.blob_id}.blob.data.chunk_map"), bs.blobs[0].chunk_count)
    assert chunk_map.ready_count() == 0
    # the fault goes away (blob replaced by a new file): the same read succeeds
    tmp = img.blob.with_suffix(".new")
    tmp.write_bytes(original)
    os.replace(tmp, img.blob)
    assert cache.read(victim) == data[2 * CS : 3 * CS]
    assert cache.is_ready(victim)
    cache.close()


def test_corrupt_neighbour_in_amplified_read_fails_only_itself(tmp_path: Path) -> None:
    img, bs, data = _image(tmp_path)
    chunks = _file_chunks(bs, "data.bin")
    victim = chunks[1]
    flip_byte(img.blob, victim.compressed_offset + 3)
    src = CountingSource(str(img.blob_dir))
    cache = _cache(img, bs, tmp_path / "cache", src, amplify_io=1 << 20)
    assert cache.read(chunks[0]) == data[:CS]  # one range read covering chunk 1 too
    assert len(src.calls) == 1
    assert not cache.is_ready(victim) and cache.is_ready(chunks[2])
    with pytest.raises(ChunkCorrupt):
        cache.read(victim)
    cache.close()


def test_single_flight_one_fetch_for_many_readers(tmp_path: Path) -> None:
    img, bs, data = _image(tmp_path)
    chunks = _file_chunks(bs, "data.bin")
    src = CountingSource(str(img.blob_dir), delay=0.2)
    cache = _cache(img, bs, tmp_path / "cache", src, amplify_io=0)
    results: list[bytes] = []
    lock = threading.Lock()

    def reader() -> None:
        got = cache.read(chunks[4])
        with lock:
            results.append(got)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data[4 * CS : 5 * CS]] * 8
    assert src.calls == [(chunks[4].compressed_offset, chunks[4].compressed_size)]
    cache.close()


def test_amplified_reads_are_bounded(tmp_path: Path) -> None:
    img, bs, data = _image(tmp_path)
    chunks = _file_chunks(bs, "data.bin")
    src = CountingSource(str(img.blob_dir))
    limit = 3 * CS
    cache = _cache(img, bs, tmp_path / "cache", src, amplify_io=limit)
    assert b"".join(cache.read(c) for c in chunks) == data
    assert 1 < len(src.calls) < len(chunks)  # fewer requests than chunks, but more than one
    assert all(size <= limit for _, size in src.calls)
    cache.close()


def test_amplified_read_of_a_file_stops_at_its_end(tmp_path: Path) -> None:
    """Told which file it reads, a miss takes that file's following chunks (within amplify_io) and
    only `amplify_across_files` bytes of whatever the build put after it."""
    files = {"a/first.bin": os.urandom(3 * CS), "a/second.bin": os.urandom(2 * CS), "a/third.bin": b"3" * 100}
    img = build_image(tmp_path / "img", files, chunk_size=CS)
    bs = Bootstrap.open(img.bootstrap)
    first, second = _file_chunks(bs, "a/first.bin"), _file_chunks(bs, "a/second.bin")
    layout = sorted([(first[0].compressed_offset, "first"), (second[0].compressed_offset, "second")])
    before, after = (first, second) if layout[0][1] == "first" else (second, first)
    src = CountingSource(str(img.blob_dir))
    cache = _cache(img, bs, tmp_path / "cache", src, amplify_io=1 << 20, amplify_across_files=0)
    assert cache.read(before[0], file_chunks=before) == cache.read_cached(before[0], 0, CS)
    assert len(src.calls) == 1 and all(cache.is_ready(c) for c in before)
    assert not any(cache.is_ready(c) for c in after)  # the neighbour file was not fetched
    (offset, size) = src.calls[0]
    assert offset + size == before[-1].compressed_offset + before[-1].compressed_size
    # a budget past the file's end takes the neighbour's first chunk too, not more
    src2 = CountingSource(str(img.blob_dir))
    budget = after[0].compressed_size
    wide = _cache(img, bs, tmp_path / "cache2", src2, amplify_io=1 << 20, amplify_across_files=budget)
    wide.read(before[0], file_chunks=before)
    assert wide.is_ready(after[0]) and not wide.is_ready(after[1])
    # without a file (prefetch, fetch_all) the window stays amplify_io wide
    src3 = CountingSource(str(img.blob_dir))
    blind = _cache(img, bs, tmp_path / "cache3", src3, amplify_io=1 << 20, amplify_across_files=0)
    blind.read(before[0])
    assert all(blind.is_ready(c) for c in after)
    for c in (cache, wide, blind):
        c.close()


def test_prefetch_windows_merge_neighbours_and_keep_the_lists_order(tmp_path: Path) -> None:
    """A prefetch list becomes windows of neighbouring chunks up to merging_size, first-needed
    window first; each window is one request, and cached chunks are not fetched again."""
    img, bs, data = _image(tmp_path)
    chunks = _file_chunks(bs, "data.bin")  # 11 chunks, stored one after another
    src = CountingSource(str(img.blob_dir))
    cache = _cache(img, bs, tmp_path / "cache", src, amplify_io=0)
    ranges = [cache.stored_range(c) for c in chunks]
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, as built
    merging = ranges[2][0] + ranges[2][1] - ranges[0][0]  # three chunks fit a window
    wanted = list(reversed(chunks[6:])) + chunks[:6]  # the list needs the file's tail first
    windows = prefetch_windows(cache, wanted, merging)
    assert [len(w) for w in windows] == [2, 3, 3, 3]
    assert windows[0] == chunks[9:]  # holds the list's first chunk (the last one of the file)
    assert [c for w in sorted(windows, key=lambda w: w[0].index) for c in w] == chunks
    assert cache.read(chunks[4]) == data[4 * CS : 5 * CS]  # one chunk already cached
    src.calls.clear()
    requests = sum(cache.fetch_window(w) for w in windows)
    assert requests == len(src.calls) == 5  # the window around the cached chunk is split in two
    assert all(size <= merging for _, size in src.calls)
    assert all(cache.is_ready(c) for c in chunks)
    assert b"".join(cache.read_cached(c, 0, c.uncompressed_size) for c in chunks) == data
    src.calls.clear()
    assert sum(cache.fetch_window(w) for w in windows) == 0 and src.calls == []
    cache.close()


def test_prefetch_window_with_a_corrupt_chunk_caches_the_others(tmp_path: Path) -> None:
    img, bs, _ = _image(tmp_path)
    chunks = _file_chunks(bs, "data.bin")
    flip_byte(img.blob, chunks[1].compressed_offset + 2)
    cache = _cache(img, bs, tmp_path / "cache", amplify_io=0)
    assert cache.fetch_window(chunks[:3]) == 1
    assert cache.is_ready(chunks[0]) and cache.is_ready(chunks[2]) and not cache.is_ready(chunks[1])
    with pytest.raises(ChunkCorrupt):
        cache.read(chunks[1])
    cache.close()


def test_registry_source_adapter_calls_read_range(tmp_path: Path) -> None:
    img, bs, data = _image(tmp_path)
    seen: list[tuple[str, int, int]] = []
    blob = img.blob.read_bytes()

    def read_range(blob_id: str, offset: int, size: int) -> bytes:
        seen.append((blob_id, offset, size))
        return blob[offset : offset + size]

    cache = _cache(img, bs, tmp_path / "cache", RegistrySource(read_range))
    chunks = _file_chunks(bs, "data.bin")
    assert cache.read(chunks[0]) == data[:CS]
    assert seen and seen[0][0] == img.blob_id
    # a short answer from the registry is an error, not silently cached garbage
    short = RegistrySource(lambda b, o, s: blob[o : o + s - 1])
    other = _cache(img, bs, tmp_path / "cache2", short, amplify_io=0)
    with pytest.raises(OSError, match="wanted"):
        other.read(chunks[5])
    assert not other.is_ready(chunks[5])
    cache.close()
    other.close()


def test_chunk_map_ignores_foreign_or_mismatched_file(tmp_path: Path) -> None:
    path = tmp_path / "x.chunk_map"
    m = ChunkMap(str(path), 20)
    m.mark(3)
    m.mark(19)
    m.close()
    again = ChunkMap(str(path), 20)
    assert again.is_ready(3) and again.is_ready(19) and again.ready_count() == 2
    again.close()
    # a size for another chunk count means another layout: start empty rather than trust it
    other = ChunkMap(str(path), 30)
    assert other.ready_count() == 0
    other.close()
    path.write_bytes(b"garbage")
    assert ChunkMap(str(path), 20).ready_count() == 0


def test_chunk_map_has_nydusd_layout(tmp_path: Path) -> None:
    """The file nydusd itself writes and reads: header, MSB-first bits, the all-ready latch."""
    path = tmp_path / "blob.blob.data.chunk_map"
    m = ChunkMap(str(path), 10)
    m.mark(0)
    m.mark(9)
    raw = path.read_bytes()
    assert len(raw) == 4096 + 2
    assert struct.unpack_from("<IIII", raw) == (0x424D4150, 1, 0x434D4150, 0)
    assert raw[4096:] == bytes([0x80, 0x40])
    # a second user of the cache dir (another daemon) sees the same bits through its mapping
    peer = ChunkMap(str(path), 10)
    for i in range(1, 9):
        peer.mark(i)
    assert m.is_ready(5) and m.all_ready()
    assert struct.unpack_from("<I", path.read_bytes(), 12)[0] == 0x4D4D4150
    m.close()
    peer.close()
