"""Native nydus data blobs: chunk codecs, digests, the ToC and the chunk-info (ci) table.

formats.md §2.6-2.8. A blob is chunk data followed by "reverse tar" sections (each section is
followed by a 512-byte tar header naming it), the last one being the ToC `rafs.blob.toc`.
Everything here both parses and packs, so reader and writer share one definition.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import blake3 as _blake3
import lz4.block
import zstandard

from nydus_core.data.rafs import DigestMismatch, RafsError

# Compression codes as stored in the blob table / ci header.
COMPRESSOR_NONE = 0
COMPRESSOR_LZ4_BLOCK = 1
COMPRESSOR_GZIP = 2
COMPRESSOR_ZSTD = 3
COMPRESSOR_NAMES = {"none": 0, "lz4_block": 1, "gzip": 2, "zstd": 3}

DIGEST_BLAKE3 = 0
DIGEST_SHA256 = 1
DIGESTER_NAMES = {"blake3": 0, "sha256": 1}

# BlobFeatures bits we use or must recognise.
FEATURE_ALIGNED = 0x1
FEATURE_INLINED_FS_META = 0x2
FEATURE_CHUNK_INFO_V2 = 0x4
FEATURE_ZRAN = 0x8
FEATURE_SEPARATE = 0x10
FEATURE_INLINED_CHUNK_DIGEST = 0x20
FEATURE_TARFS = 0x40
FEATURE_BATCH = 0x80
FEATURE_ENCRYPTED = 0x100
FEATURE_HAS_TAR_HEADER = 0x10000000
FEATURE_HAS_TOC = 0x20000000
FEATURE_CAP_TAR_TOC = 0x40000000

CI_MAGIC = 0xB10BB10B
CI_HEADER_SIZE = 4096
TAR_BLOCK = 512
TOC_NAME = b"rafs.blob.toc"
TOC_ENTRY_SIZE = 128

# ToC entry flags (compression of the section).
TOC_FLAG_NONE = 0x1
TOC_FLAG_ZSTD = 0x2
TOC_FLAG_LZ4 = 0x4


def compressor_name(code: int) -> str:
    for name, value in COMPRESSOR_NAMES.items():
        if value == code:
            return name
    raise RafsError(f"unknown compression algorithm code {code}")


def compress(code: int, data: bytes) -> bytes:
    """Compress one chunk; the caller stores it raw when this does not make it smaller."""
    if code == COMPRESSOR_NONE:
        return data
    if code == COMPRESSOR_LZ4_BLOCK:
        return bytes(lz4.block.compress(data, store_size=False))
    if code == COMPRESSOR_ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise RafsError(f"compressor {compressor_name(code)} is not supported for writing")


def decompress(code: int, data: bytes, size: int, what: str) -> bytes:
    """Decompress one chunk of known uncompressed `size`; errors name `what`."""
    try:
        if code == COMPRESSOR_NONE:
            out = data
        elif code == COMPRESSOR_LZ4_BLOCK:
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif code == COMPRESSOR_ZSTD:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif code == COMPRESSOR_GZIP:
            import gzip

            out = gzip.decompress(data)
        else:
            raise RafsError(f"{what}: unknown compression algorithm code {code}")
    except RafsError:
        raise
    except Exception as exc:  # codec libraries raise their own types
        raise RafsError(f"{what}: cannot decompress ({compressor_name(code)}): {exc}") from exc
    if len(out) != size:
        raise RafsError(f"{what}: decompressed to {len(out)} bytes, expected {size}")
    return out


def digest(code: int, data: bytes) -> bytes:
    if code == DIGEST_BLAKE3:
        return _blake3.blake3(data).digest()
    if code == DIGEST_SHA256:
        return hashlib.sha256(data).digest()
    raise RafsError(f"unknown digest algorithm code {code}")


# -- tar headers around sections -------------------------------------------------------------------
def tar_header(name: bytes, size: int) -> bytes:
    """GNU tar header (type '0') as nydus writes after each blob section."""
    if len(name) > 99:
        raise RafsError(f"tar section name too long: {name!r}")
    hdr = bytearray(TAR_BLOCK)
    hdr[0 : len(name)] = name
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"00000000000\0"
    hdr[156:157] = b"0"
    hdr[257:265] = b"ustar  \0"
    hdr[148:156] = b" " * 8
    checksum = sum(hdr)
    hdr[148:156] = b"%06o\0 " % checksum
    return bytes(hdr)


def parse_tar_header(hdr: bytes, what: str) -> tuple[bytes, int]:
    """Name and size of a section header; checks the checksum so garbage is not taken as a ToC."""
    if len(hdr) != TAR_BLOCK:
        raise RafsError(f"{what}: truncated tar header")
    try:
        stored = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError as exc:
        raise RafsError(f"{what}: malformed tar header") from exc
    actual = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    if stored != actual:
        raise RafsError(f"{what}: tar header checksum mismatch (stored {stored}, computed {actual})")
    return hdr[:100].split(b"\0", 1)[0], size


@dataclass(frozen=True)
class TocEntry:
    """One 128-byte blob ToC entry."""

    flags: int
    name: bytes
    uncompressed_digest: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    _S = struct.Struct("<II16s32sQQQ48x")

    @classmethod
    def parse(cls, raw: bytes, off: int) -> TocEntry:
        flags, _, name, dig, coff, csize, usize = cls._S.unpack_from(raw, off)
        return cls(flags, name.rstrip(b"\0"), dig, coff, csize, usize)

    def pack(self) -> bytes:
        return self._S.pack(self.flags, 0, self.name, self.uncompressed_digest, self.compressed_offset,
                            self.compressed_size, self.uncompressed_size)  # fmt: skip


assert TocEntry._S.size == TOC_ENTRY_SIZE


def _pread(f: BinaryIO, off: int, size: int, what: str) -> bytes:
    if off < 0 or size < 0 or off + size > 1 << 62:
        raise RafsError(f"{what}: invalid range offset {off} size {size}; corrupt metadata")
    try:
        f.seek(off)
        data = f.read(size)
    except OSError as exc:
        raise RafsError(f"{what}: cannot read {size} bytes at offset {off}: {exc}") from exc
    if len(data) != size:
        raise RafsError(f"{what}: wanted {size} bytes at offset {off}, blob has only {len(data)}; truncated")
    return data


def _blob_size(f: BinaryIO) -> int:
    f.seek(0, 2)
    return f.tell()


@dataclass(frozen=True)
class BlobToc:
    """The parsed ToC: entries by name, plus the digest that the blob table may pin."""

    entries: dict[bytes, TocEntry]
    digest: bytes  # sha256(entries ‖ tar header)
    size: int  # bytes of entries + header, i.e. blob_toc_size


def read_toc(f: BinaryIO, what: str = "blob", expected_digest: bytes | None = None) -> BlobToc:
    """Locate and parse the ToC at the end of a blob."""
    size = _blob_size(f)
    if size < TAR_BLOCK:
        raise RafsError(f"{what}: {size} bytes is too short to end with a ToC")
    hdr = _pread(f, size - TAR_BLOCK, TAR_BLOCK, f"{what} ToC header")
    name, toc_size = parse_tar_header(hdr, f"{what} ToC header")
    if name != TOC_NAME:
        raise RafsError(f"{what}: last section is {name!r}, not {TOC_NAME.decode()} (no ToC)")
    if toc_size % TOC_ENTRY_SIZE or toc_size > size - TAR_BLOCK:
        raise RafsError(f"{what}: invalid ToC size {toc_size}")
    raw = _pread(f, size - TAR_BLOCK - toc_size, toc_size, f"{what} ToC")
    dig = hashlib.sha256(raw + hdr).digest()
    if expected_digest and any(expected_digest) and dig != expected_digest:
        raise RafsError(
            f"{what}: ToC digest {dig.hex()} differs from the bootstrap's {expected_digest.hex()}"
        )
    entries = {}
    for i in range(toc_size // TOC_ENTRY_SIZE):
        e = TocEntry.parse(raw, i * TOC_ENTRY_SIZE)
        entries[e.name] = e
    return BlobToc(entries, dig, toc_size + TAR_BLOCK)


def read_toc_section(f: BinaryIO, toc: BlobToc, name: bytes, what: str = "blob") -> bytes:
    """Content of a named ToC section, decompressed and checked against its sha256."""
    if name == b"image.blob":
        raise RafsError(f"{what}: image.blob is chunk data; read it chunk by chunk")
    entry = toc.entries.get(name)
    if entry is None:
        raise RafsError(f"{what}: ToC has no {name.decode(errors='replace')} entry")
    sect = f"{what} section {name.decode(errors='replace')}"
    raw = _pread(f, entry.compressed_offset, entry.compressed_size, sect)
    if entry.flags & TOC_FLAG_ZSTD:
        data = decompress(COMPRESSOR_ZSTD, raw, entry.uncompressed_size, sect)
    elif entry.flags & TOC_FLAG_LZ4:
        data = decompress(COMPRESSOR_LZ4_BLOCK, raw, entry.uncompressed_size, sect)
    else:
        data = raw
    if any(entry.uncompressed_digest) and hashlib.sha256(data).digest() != entry.uncompressed_digest:
        raise DigestMismatch(f"{sect}: sha256 does not match the ToC")
    return data


def verify_blob_data(f: BinaryIO, toc: BlobToc, what: str = "blob") -> None:
    """Check the `image.blob` ToC digest: sha256 of all chunk data plus its tar header.

    Chunk data always starts at offset 0 (nydus-image 2.2 wrote the data size into the entry's
    offset field; the size field is reliable).
    """
    entry = toc.entries.get(b"image.blob")
    if entry is None or not any(entry.uncompressed_digest):
        return
    h = hashlib.sha256()
    left, pos = entry.compressed_size + TAR_BLOCK, 0
    while left:
        piece = _pread(f, pos, min(left, 1 << 20), f"{what} chunk data")
        h.update(piece)
        pos += len(piece)
        left -= len(piece)
    if h.digest() != entry.uncompressed_digest:
        raise DigestMismatch(f"{what}: chunk data does not match the ToC's image.blob digest")


# -- chunk info (ci) -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlobChunk:
    """Where one chunk lives in a blob (compressed) and in its aligned uncompressed layout."""

    index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    aux: int = 0  # `ChunkInfo.aux`: format-specific (the inner offset of an eStargz chunk)


def pack_ci_v1(c: BlobChunk) -> bytes:
    """16-byte v1 entry: sizes minus one split 20/4 bits."""
    if c.uncompressed_offset % 4096:
        raise RafsError(f"chunk {c.index}: uncompressed offset {c.uncompressed_offset} is not 4 KiB aligned")
    us, cs = c.uncompressed_size - 1, c.compressed_size - 1
    uncomp = (c.uncompressed_offset & 0xFFF_FFFF_F000) | ((us & 0xFFFFF) << 44) | (((us >> 20) & 0xF) << 8)
    comp = (c.compressed_offset & 0xFF_FFFF_FFFF) | ((cs & 0xFFFFF) << 44) | (((cs >> 20) & 0xF) << 40)
    return struct.pack("<QQ", uncomp, comp)


def parse_ci(raw: bytes, count: int, v2: bool, what: str) -> list[BlobChunk]:
    unit = 24 if v2 else 16
    if len(raw) < unit * count:
        raise RafsError(
            f"{what}: chunk-info table holds {len(raw)} bytes, {count} entries need {unit * count}"
        )
    out = []
    for i in range(count):
        if v2:
            uncomp, comp, _data = struct.unpack_from("<QQQ", raw, i * 24)
            uoff = (uncomp & 0xFFFFFFFF) << 12
            usize = ((uncomp >> 32) & 0xFFFFFF) + 1
            flags = uncomp >> 56
            coff = comp & 0xFF_FFFF_FFFF
            csize = comp >> 40
            if flags & 0x0E:
                raise RafsError(f"{what}: chunk {i} uses zran/batch/encryption, not a native chunk")
            out.append(BlobChunk(i, coff, csize, uoff, usize, bool(flags & 1)))
        else:
            uncomp, comp = struct.unpack_from("<QQ", raw, i * 16)
            uoff = uncomp & 0xFFF_FFFF_F000
            usize = ((uncomp >> 44) | (((uncomp >> 8) & 0xF) << 20)) + 1
            coff = comp & 0xFF_FFFF_FFFF
            csize = ((comp >> 44) | (((comp >> 40) & 0xF) << 20)) + 1
            out.append(BlobChunk(i, coff, csize, uoff, usize, csize != usize))
    return out


@dataclass(frozen=True)
class CiHeader:
    """The 4096-byte blob meta header that follows the ci table."""

    features: int
    ci_compressor: int
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int = 0
    zran_size: int = 0
    zran_count: int = 0

    _S = struct.Struct("<IIIIQQQQQI")

    @classmethod
    def parse(cls, raw: bytes, what: str) -> CiHeader:
        if len(raw) != CI_HEADER_SIZE:
            raise RafsError(f"{what}: ci header must be {CI_HEADER_SIZE} bytes")
        magic, *rest = cls._S.unpack_from(raw, 0)
        (magic2,) = struct.unpack_from("<I", raw, CI_HEADER_SIZE - 4)
        if magic != CI_MAGIC or magic2 != CI_MAGIC:
            raise RafsError(f"{what}: bad blob meta magic {magic:#x}/{magic2:#x}")
        return cls(*rest)

    def pack(self) -> bytes:
        out = bytearray(CI_HEADER_SIZE)
        values = (self.features, self.ci_compressor, self.ci_entries, self.ci_offset, self.ci_compressed_size,
                  self.ci_uncompressed_size, self.zran_offset, self.zran_size, self.zran_count)  # fmt: skip
        self._S.pack_into(out, 0, CI_MAGIC, *values)
        struct.pack_into("<I", out, CI_HEADER_SIZE - 4, CI_MAGIC)
        return bytes(out)


# -- chunk reader ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkLocation:
    """What a reader needs to fetch, decode and verify one chunk."""

    blob_id: str
    index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int
    compressed: bool
    digest: bytes | None  # None: nothing to verify against


class BlobReader:
    """Reads chunks of one native blob from a seekable file, verifying each chunk's digest."""

    def __init__(self, f: BinaryIO, blob_id: str, compressor: int, digester: int) -> None:
        self.f = f
        self.blob_id = blob_id
        self.compressor = compressor
        self.digester = digester

    def read_chunk(self, loc: ChunkLocation) -> bytes:
        what = f"blob {self.blob_id} chunk {loc.index}"
        raw = _pread(self.f, loc.compressed_offset, loc.compressed_size, what)
        if loc.compressed:
            data = decompress(self.compressor, raw, loc.uncompressed_size, what)
        else:
            if loc.compressed_size < loc.uncompressed_size:
                raise RafsError(
                    f"{what}: stored raw but {loc.compressed_size} < {loc.uncompressed_size} bytes"
                )
            data = raw[: loc.uncompressed_size]
        if loc.digest is not None:
            got = digest(self.digester, data)
            if got != loc.digest:
                raise DigestMismatch(
                    f"{what}: digest mismatch, metadata says {loc.digest.hex()}, data hashes to {got.hex()}"
                )
        return data


ChunkSource = Callable[[int, int], bytes]


def read_blob_ci(
    f: BinaryIO, ci_offset: int, ci_compressed_size: int, chunk_count: int, what: str = "blob"
) -> tuple[CiHeader, list[BlobChunk]]:
    """A blob's own chunk-info table (what nydusd caches as `<blob_id>.blob.meta`), header checked."""
    header = CiHeader.parse(_pread(f, ci_offset + ci_compressed_size, CI_HEADER_SIZE, f"{what} ci header"),
                            what)  # fmt: skip
    if (header.ci_offset, header.ci_compressed_size, header.ci_entries) != (ci_offset, ci_compressed_size,
                                                                            chunk_count):  # fmt: skip
        raise RafsError(f"{what}: ci header disagrees with the blob table (offset/size/entries)")
    raw = _pread(f, ci_offset, ci_compressed_size, f"{what} ci table")
    if header.ci_compressor != COMPRESSOR_NONE:
        raw = decompress(header.ci_compressor, raw, header.ci_uncompressed_size, f"{what} ci table")
    v2 = bool(header.features & FEATURE_CHUNK_INFO_V2)
    return header, parse_ci(raw, chunk_count, v2, what)
