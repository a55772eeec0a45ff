"""The daemon side: a chunk of an eStargz blob is a range of one gzip member's output.

`read_range` is the member's compressed extent (from its offset to the next member); `decode`
inflates it only as far as the chunk reaches: skip ``innerOffset`` bytes (kept in
`ChunkInfo.aux`), take ``uncompressed_size``. The blob cache then checks the result against the
TOC's ``chunkDigest`` before it is cached or returned, so a flipped byte is EIO, never data.

It accepts gzip blobs that are neither zran nor tarfs. A native nydus gzip chunk is a whole gzip
stream of exactly one chunk (inner offset 0), which this reads correctly too.
"""

from __future__ import annotations

import zlib

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import COMPRESSOR_NAMES, FEATURE_TARFS, FEATURE_ZRAN
from nydus_core.data.rafs.bootstrap import BlobEntry, ChunkInfo
from nydus_core.records import BlobDecoder

GZIP = COMPRESSOR_NAMES["gzip"]


class GzipMemberDecoder(BlobDecoder):
    """eStargz chunks: inflate the member from its start, cut the payload at its inner offset."""

    def accepts(self, blob: BlobEntry) -> bool:
        return blob.compression_algo == GZIP and not blob.features & (FEATURE_ZRAN | FEATURE_TARFS)

    def decode(self, blob: BlobEntry, chunk: ChunkInfo, raw: bytes) -> bytes:
        want = chunk.aux + chunk.uncompressed_size
        what = f"layer sha256:{blob.blob_id} chunk {chunk.index} (gzip member at {chunk.compressed_offset})"
        d = zlib.decompressobj(31)
        out = bytearray()
        data = raw
        try:
            while len(out) < want and data:
                out += d.decompress(data, want - len(out))
                data = d.unconsumed_tail
                if d.eof:
                    break
        except zlib.error as e:
            raise RafsError(f"{what}: not valid gzip: {e}") from None
        if len(out) < want:
            raise RafsError(f"{what}: the member holds {len(out)} bytes, the chunk needs {want}")
        return bytes(out[chunk.aux : want])


GZIP_MEMBER_DECODER = GzipMemberDecoder()
