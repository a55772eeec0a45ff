"""RAFS v6 bootstrap: an EROFS image plus the nydus extension superblock, blob and chunk tables.

formats.md §2.1-2.5. The bootstrap alone names every chunk of every file (blob index, ci index,
uncompressed block address); together with the 80-byte chunk table it locates and verifies the
bytes in the blobs without the blobs' own ci tables.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import (
    COMPRESSOR_NAMES,
    DIGESTER_NAMES,
    BlobReader,
    ChunkLocation,
    read_toc,
    read_toc_section,
)
from nydus_core.data.rafs.erofs import COMPAT_RAFS_V6, SB_OFFSET, SB_SIZE, ErofsImage, Inode

EXT_SB_OFFSET = SB_OFFSET + SB_SIZE  # 1152
EXT_SB_SIZE = 256
DEVT_SLOTOFF = (EXT_SB_OFFSET + EXT_SB_SIZE) // 128  # 11
BLOB_ENTRY_SIZE = 256
CHUNK_INFO_SIZE = 80
RAFS_V5_MAGIC = 0x52414653

# RafsSuperFlags
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200

COMPRESSION_FLAGS = {0: FLAG_COMPRESSION_NONE, 1: FLAG_COMPRESSION_LZ4, 2: FLAG_COMPRESSION_GZIP,
                     3: FLAG_COMPRESSION_ZSTD}  # fmt: skip
DIGEST_FLAGS = {0: FLAG_HASH_BLAKE3, 1: FLAG_HASH_SHA256}

CHUNK_FLAG_COMPRESSED = 0x1
CHUNK_FLAG_HOLE = 0x2

_EXT = struct.Struct("<QQIIQQQII200s")
assert _EXT.size == EXT_SB_SIZE


@dataclass
class ExtSuperblock:
    """RAFS v6 extension superblock at byte 1152 (invisible to the kernel)."""

    flags: int = 0
    blob_table_offset: int = 0
    blob_table_size: int = 0
    chunk_size: int = 1 << 20
    chunk_table_offset: int = 0
    chunk_table_size: int = 0
    prefetch_table_offset: int = 0
    prefetch_table_size: int = 0
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> ExtSuperblock:
        if len(data) < EXT_SB_OFFSET + EXT_SB_SIZE:
            raise RafsError("bootstrap too short for the RAFS v6 extension superblock")
        return cls(*_EXT.unpack_from(data, EXT_SB_OFFSET)[:9])

    def pack(self) -> bytes:
        return _EXT.pack(self.flags, self.blob_table_offset, self.blob_table_size, self.chunk_size,
                         self.chunk_table_offset, self.chunk_table_size, self.prefetch_table_offset,
                         self.prefetch_table_size, self.padding, b"\0" * 200)  # fmt: skip


_BLOB = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQ8sI36s")
assert _BLOB.size == BLOB_ENTRY_SIZE


@dataclass
class BlobEntry:
    """`RafsV6Blob`: one blob-table entry."""

    blob_id: str
    blob_index: int = 0
    chunk_size: int = 1 << 20
    chunk_count: int = 0
    compression_algo: int = 0
    digest_algo: int = 0
    features: int = 0
    compressed_size: int = 0
    uncompressed_size: int = 0
    blob_toc_size: int = 0
    ci_compressor: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_digest: bytes = b"\0" * 32
    blob_meta_digest: bytes = b"\0" * 32
    blob_meta_size: int = 0
    cipher_iv: bytes = b"\0" * 8
    cipher_algo: int = 0

    @classmethod
    def parse(cls, raw: bytes, off: int) -> BlobEntry:
        fields = list(_BLOB.unpack_from(raw, off))[:19]
        bid = fields[0].rstrip(b"\0")
        try:
            fields[0] = bid.decode("ascii")
        except UnicodeDecodeError as exc:
            raise RafsError(f"blob table entry at {off}: blob id is not ASCII") from exc
        return cls(*fields)

    def pack(self) -> bytes:
        return _BLOB.pack(self.blob_id.encode(), self.blob_index, self.chunk_size, self.chunk_count,
                          self.compression_algo, self.digest_algo, self.features, self.compressed_size,
                          self.uncompressed_size, self.blob_toc_size, self.ci_compressor, self.ci_offset,
                          self.ci_compressed_size, self.ci_uncompressed_size, self.blob_toc_digest,
                          self.blob_meta_digest, self.blob_meta_size, self.cipher_iv, self.cipher_algo,
                          b"\0" * 36)  # fmt: skip


_CHUNK = struct.Struct("<32sIIIIQQQII")
assert _CHUNK.size == CHUNK_INFO_SIZE


@dataclass(frozen=True)
class ChunkInfo:
    """An 80-byte entry of the bootstrap chunk table (`RafsV5ChunkInfo`)."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    # The u32 after `index`: reserved in RAFS v5, a crc32 in newer nydus (under its chunk flag),
    # the chunk's offset inside its gzip member in eStargz blobs. Kept as is by merges.
    aux: int = 0

    @classmethod
    def parse(cls, raw: bytes, off: int) -> ChunkInfo:
        return cls(*_CHUNK.unpack_from(raw, off))

    def pack(self) -> bytes:
        return _CHUNK.pack(self.digest, self.blob_index, self.flags, self.compressed_size,
                           self.uncompressed_size, self.compressed_offset, self.uncompressed_offset,
                           self.file_offset, self.index, self.aux)  # fmt: skip


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file as the inode names it."""

    blob_index: int
    ci_index: int
    blkaddr: int


def detect_version(head: bytes) -> int:
    """5 or 6 from the first bytes of a bootstrap; `RafsError` for anything else."""
    if len(head) >= 8 and struct.unpack_from("<II", head, 0) == (RAFS_V5_MAGIC, 0x500):
        return 5
    if len(head) >= SB_OFFSET + 4 and struct.unpack_from("<I", head, SB_OFFSET)[0] == 0xE0F5E1E2:
        return 6
    raise RafsError("not a RAFS bootstrap: neither the RAFS v5 nor the EROFS (v6) magic is present")


class Bootstrap:
    """A parsed RAFS v6 bootstrap."""

    def __init__(self, data: bytes) -> None:
        if detect_version(data) != 6:
            raise RafsError("RAFS v5 bootstrap given where v6 was expected")
        if len(data) % 4096:
            raise RafsError(f"bootstrap size {len(data)} is not a multiple of 4096 (truncated?)")
        self.erofs = ErofsImage(data)
        self.data = data
        sb = self.erofs.sb
        if not sb.feature_compat & COMPAT_RAFS_V6:
            raise RafsError("EROFS image is not a RAFS v6 bootstrap (compat bit 0x40000000 missing)")
        self.ext = ExtSuperblock.parse(data)
        cs = self.ext.chunk_size
        if cs < 4096 or cs > 16 << 20 or cs & (cs - 1):
            raise RafsError(f"invalid RAFS chunk size {cs}")
        self.blobs = self._read_blobs()
        self.chunks = self._read_chunks()
        self.chunk_map = {(c.blob_index, c.index): c for c in self.chunks}
        self.prefetch = self._read_prefetch()
        if len(self.erofs.devices) != len(self.blobs):
            raise RafsError(
                f"{len(self.erofs.devices)} device slots but {len(self.blobs)} blob table entries"
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Bootstrap:
        with open(path, "rb") as f:
            return cls(f.read())

    def _table(self, off: int, size: int, what: str) -> bytes:
        if off + size > len(self.data) or off < 0:
            raise RafsError(
                f"{what} [{off}, {off + size}) lies outside the bootstrap ({len(self.data)} bytes)"
            )
        return self.data[off : off + size]

    def _read_blobs(self) -> list[BlobEntry]:
        size = self.ext.blob_table_size
        if size % BLOB_ENTRY_SIZE:
            raise RafsError(f"blob table size {size} is not a multiple of {BLOB_ENTRY_SIZE}")
        raw = self._table(self.ext.blob_table_offset, size, "blob table")
        blobs = [BlobEntry.parse(raw, i) for i in range(0, size, BLOB_ENTRY_SIZE)]
        for i, b in enumerate(blobs):
            if b.blob_index != i:
                raise RafsError(f"blob table entry {i} says it is index {b.blob_index}")
            if len(b.blob_id) != 64:
                raise RafsError(f"blob table entry {i}: blob id {b.blob_id!r} is not 64 characters")
        return blobs

    def _read_chunks(self) -> list[ChunkInfo]:
        size = self.ext.chunk_table_size
        if size % CHUNK_INFO_SIZE:
            raise RafsError(f"chunk table size {size} is not a multiple of {CHUNK_INFO_SIZE}")
        raw = self._table(self.ext.chunk_table_offset, size, "chunk table")
        return [ChunkInfo.parse(raw, i) for i in range(0, size, CHUNK_INFO_SIZE)]

    def _read_prefetch(self) -> list[int]:
        raw = self._table(self.ext.prefetch_table_offset, self.ext.prefetch_table_size, "prefetch table")
        return list(struct.unpack(f"<{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))

    @property
    def compressor(self) -> str:
        for code, flag in COMPRESSION_FLAGS.items():
            if self.ext.flags & flag:
                return next(k for k, v in COMPRESSOR_NAMES.items() if v == code)
        return "none"

    @property
    def digester(self) -> str:
        return "sha256" if self.ext.flags & FLAG_HASH_SHA256 else "blake3"

    def file_chunks(self, inode: Inode) -> list[ChunkRef]:
        """The chunk refs of a regular file, one per `s_chunk_size` piece."""
        refs = []
        for i, idx in enumerate(self.erofs.chunk_indexes(inode, self.ext.chunk_size)):
            blob = (idx.device_id & 0xFF) - 1
            ci = idx.advise | ((idx.device_id >> 8) << 16)
            if not 0 <= blob < len(self.blobs):
                raise RafsError(f"nid {inode.nid} chunk {i}: blob index {blob} outside the blob table")
            refs.append(ChunkRef(blob, ci, idx.blkaddr))
        return refs

    def chunk_info(self, ref: ChunkRef, what: str) -> ChunkInfo:
        info = self.chunk_map.get((ref.blob_index, ref.ci_index))
        if info is None:
            raise RafsError(
                f"{what}: chunk (blob {ref.blob_index}, index {ref.ci_index}) not in the chunk table"
            )
        return info

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        return self.erofs.walk()


class BlobSet:
    """Opens the blobs a bootstrap names from a directory (or explicit paths) and reads file data."""

    def __init__(self, bootstrap: Bootstrap, paths: dict[str, str]) -> None:
        self.bootstrap = bootstrap
        self.paths = paths
        self._files: dict[int, BinaryIO] = {}

    @classmethod
    def from_dir(cls, bootstrap: Bootstrap, blob_dir: str) -> BlobSet:
        return cls(bootstrap, {b.blob_id: os.path.join(blob_dir, b.blob_id) for b in bootstrap.blobs})

    def _reader(self, blob_index: int) -> BlobReader:
        entry = self.bootstrap.blobs[blob_index]
        f = self._files.get(blob_index)
        if f is None:
            path = self.paths.get(entry.blob_id)
            if path is None or not os.path.exists(path):
                raise RafsError(f"blob {entry.blob_id} is not available (looked for {path})")
            f = open(path, "rb")  # noqa: SIM115 - kept open for the life of the set
            self._files[blob_index] = f
        return BlobReader(f, entry.blob_id, entry.compression_algo, entry.digest_algo)

    def read_chunk(self, inode: Inode, i: int, ref: ChunkRef | None = None) -> bytes:
        """Chunk `i` of a regular file (the file bytes [i*chunk_size, ...)), decoded and verified."""
        bs = self.bootstrap
        what = f"nid {inode.nid} chunk {i}"
        if ref is None:
            refs = bs.file_chunks(inode)
            if not 0 <= i < len(refs):
                raise RafsError(f"{what}: the file has {len(refs)} chunks")
            ref = refs[i]
        info = bs.chunk_info(ref, what)
        want = min(bs.ext.chunk_size, inode.size - i * bs.ext.chunk_size)
        if info.flags & CHUNK_FLAG_HOLE:
            return b"\0" * want
        data = self.read_chunk_info(ref.blob_index, info)
        if len(data) != want:
            raise RafsError(f"{what}: chunk holds {len(data)} bytes, the file needs {want} there")
        return data

    def read_chunk_info(self, blob_index: int, info: ChunkInfo) -> bytes:
        """The uncompressed bytes of one chunk-table entry, verified unless the image is tarfs."""
        reader = self._reader(blob_index)
        compressed = bool(info.flags & CHUNK_FLAG_COMPRESSED)
        # tarfs images carry no chunk digests: the layer digest covers the tar
        dig = None if self.bootstrap.ext.flags & FLAG_TARFS_MODE else info.digest
        loc = ChunkLocation(reader.blob_id, info.index, info.compressed_offset, info.compressed_size,
                            info.uncompressed_size, compressed, dig)  # fmt: skip
        return reader.read_chunk(loc)

    def read_file(self, inode: Inode) -> bytes:
        """Whole content of a regular file, every chunk decoded and digest-checked."""
        if inode.size == 0:
            return b""
        refs = self.bootstrap.file_chunks(inode)
        return b"".join(self.read_chunk(inode, i, ref) for i, ref in enumerate(refs))

    def read_range(self, inode: Inode, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file, touching only the chunks that overlap."""
        if offset < 0 or size < 0:
            raise RafsError(f"invalid read range offset={offset} size={size}")
        end = min(inode.size, offset + size)
        if offset >= end:
            return b""
        cs = self.bootstrap.ext.chunk_size
        refs = self.bootstrap.file_chunks(inode)
        parts = []
        for i in range(offset // cs, (end - 1) // cs + 1):
            data = self.read_chunk(inode, i, refs[i])
            lo = max(offset - i * cs, 0)
            hi = min(end - i * cs, len(data))
            parts.append(data[lo:hi])
        return b"".join(parts)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> BlobSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bootstrap_from_blob(f: BinaryIO, what: str = "blob") -> bytes:
    """The bootstrap inlined in a blob (`image.boot` ToC section)."""
    toc = read_toc(f, what)
    return read_toc_section(f, toc, b"image.boot", what)


__all__ = [
    "DIGESTER_NAMES",
    "BlobEntry",
    "BlobSet",
    "Bootstrap",
    "ChunkInfo",
    "ChunkRef",
    "ExtSuperblock",
    "bootstrap_from_blob",
    "detect_version",
]


def export_block(bs: Bootstrap, blobs: BlobSet, out: BinaryIO) -> int:
    """`nydus-image export --block`: one flat image, bootstrap at 0 and each blob's uncompressed
    layout at its device slot's `mapped_blkaddr`. Kernels with flat-device support (~6.5+) mount
    it alone, no `device=` options. Every chunk is verified on the way. Returns the image size.
    """
    blksz = bs.erofs.blksz
    out.seek(0)
    out.write(bs.data)
    end = len(bs.data)
    for i, slot in enumerate(bs.erofs.devices):
        base = slot.mapped_blkaddr * blksz
        if base < end:
            raise RafsError(f"device slot {i} maps blob {bs.blobs[i].blob_id} at block {slot.mapped_blkaddr},"
                            " inside earlier data; this bootstrap cannot be exported flat")  # fmt: skip
        for info in bs.chunks:
            if info.blob_index != i or info.flags & CHUNK_FLAG_HOLE:
                continue
            out.seek(base + info.uncompressed_offset)
            out.write(blobs.read_chunk_info(i, info))
        end = base + slot.blocks * blksz
    out.truncate(end)
    return end
