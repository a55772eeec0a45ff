"""Blob decoders: a RAFS instance reads each blob through the decoder the registry picks for it.

A real image (our ``nydus-image``), a real blob on disk, and a decoder of a kind the native one
cannot read: the blob is stored "sealed" -- a header of junk before the data and every stored
byte XORed. Read through the sealing decoder the files come back exactly; read through the native
decoder the same blob is caught by the chunk digests (EIO), never served as wrong bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nydus_core.data.cache import CacheError
from nydus_core.data.decoders import NATIVE_DECODER, DecoderSet, NativeDecoder
from nydus_core.data.rafs.bootstrap import BlobEntry, ChunkInfo
from nydus_core.data.runtime.instance import RafsInstance
from nydus_core.data.runtime.nydusd_json import NydusdConfig
from nydus_core.records import BlobDecoder, DecoderRecord
from nydus_core.testing.images import Image, build_image, localfs_config

HEADER = 4096 + 17  # junk before the data: every chunk's stored bytes move by this much
KEY = 0x5A


class SealedBlobs(BlobDecoder):
    """Reads blobs whose ids are in `ids`: data after `HEADER` junk bytes, XORed with `KEY`."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = ids
        self.decoded = 0

    def accepts(self, blob: BlobEntry) -> bool:
        return blob.blob_id in self.ids

    def read_range(self, blob: BlobEntry, chunk: ChunkInfo) -> tuple[int, int]:
        return chunk.compressed_offset + HEADER, chunk.compressed_size

    def decode(self, blob: BlobEntry, chunk: ChunkInfo, raw: bytes) -> bytes:
        self.decoded += 1
        return NATIVE_DECODER.decode(blob, chunk, bytes(b ^ KEY for b in raw))


FILES = {"big": os.urandom(3 << 20), "etc/motd": b"hello\n", "small": b"x" * 100}


@pytest.fixture
def sealed(tmp_path: Path) -> Image:
    """An image whose blob file is stored sealed."""
    image = build_image(tmp_path / "img", FILES, chunk_size=1 << 20, compressor="lz4_block")
    plain = image.blob.read_bytes()
    image.blob.write_bytes(os.urandom(HEADER) + bytes(b ^ KEY for b in plain))
    return image


def _read_all(inst: RafsInstance) -> dict[str, bytes]:
    out = {}
    for path in FILES:
        nid = inst.lookup_path(path)
        out[path] = inst.read(nid, 0, inst.inode(nid).size)
    return out


def _instance(image: Image, work: Path, decoders: DecoderSet) -> RafsInstance:
    config = NydusdConfig.from_dict(localfs_config(image.blob_dir, work))
    return RafsInstance(str(image.bootstrap), config, decoders=decoders)


def test_decoder_accepts(sealed: Image, tmp_path: Path) -> None:
    """The decoder set hands each blob to the highest-priority decoder that accepts it."""
    sealing = SealedBlobs({sealed.blob_id})
    decoders = DecoderSet(
        [
            DecoderRecord(name="sealed", decoder=sealing, priority=5),
            DecoderRecord(name="nydus-native", decoder=NATIVE_DECODER, priority=-100),
        ]
    )
    inst = _instance(sealed, tmp_path / "cache", decoders)
    try:
        assert [c.decoder for c in inst.caches] == [sealing]
        assert isinstance(decoders.for_blob(BlobEntry(blob_id="another")), NativeDecoder)
    finally:
        inst.close()


def test_decoder_read_range(sealed: Image, tmp_path: Path) -> None:
    """What is fetched is the decoder's range (past the header), adjacent ranges merged."""
    fetched: list[tuple[int, int]] = []
    sealing = SealedBlobs({sealed.blob_id})
    inst = _instance(sealed, tmp_path / "cache", DecoderSet([DecoderRecord(name="sealed", decoder=sealing)]))
    try:
        source_read = inst.source.read

        def spy(blob_id: str, offset: int, size: int) -> bytes:
            fetched.append((offset, size))
            return source_read(blob_id, offset, size)

        inst.source.read = spy  # type: ignore[method-assign]
        for cache in inst.caches:
            cache.source = inst.source
        nid = inst.lookup_path("big")
        inst.read(nid, 0, 4096)
        assert fetched and all(off >= HEADER for off, _ in fetched)
    finally:
        inst.close()


def test_decoder_decode(sealed: Image, tmp_path: Path) -> None:
    """Through the sealing decoder every file reads back exactly, each chunk verified against the
    bootstrap's digest; through the native decoder alone the same blob is EIO, not wrong bytes."""
    sealing = SealedBlobs({sealed.blob_id})
    inst = _instance(sealed, tmp_path / "good", DecoderSet([DecoderRecord(name="sealed", decoder=sealing)]))
    try:
        assert _read_all(inst) == FILES
        assert sealing.decoded >= 3
    finally:
        inst.close()
    native = _instance(sealed, tmp_path / "bad", DecoderSet.native_only())
    try:
        nid = native.lookup_path("big")
        with pytest.raises(CacheError) as exc:
            native.read(nid, 0, 4096)
        assert exc.value.errno == 5  # EIO
        assert native.cache_stats.digest_failures >= 1
    finally:
        native.close()


def test_decoder_that_returns_the_wrong_size_is_eio(sealed: Image, tmp_path: Path) -> None:
    class Short(SealedBlobs):
        def decode(self, blob: BlobEntry, chunk: ChunkInfo, raw: bytes) -> bytes:
            return super().decode(blob, chunk, raw)[:-1]

    inst = _instance(
        sealed, tmp_path / "c", DecoderSet([DecoderRecord(name="short", decoder=Short({sealed.blob_id}))])
    )
    try:
        with pytest.raises(CacheError, match="decoded to"):
            inst.read(inst.lookup_path("small"), 0, 100)
    finally:
        inst.close()
