"""RAFS v5 bootstrap reader (read-only; formats.md §2.12).

v5 predates the EROFS-based layout: an 8 KiB superblock, an inode table of u32 offsets (8-byte
units, indexed by inode number - 1), 128-byte inodes each followed by its name, symlink target,
xattrs and, for regular files, its 80-byte chunk infos. Directories list their children as a
contiguous range of inode numbers. Images of this kind are served by FUSE only, so the reader
turns them into the common tree model.
"""

from __future__ import annotations

import functools
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from nydus_core.data.rafs import DigestMismatch, RafsError
from nydus_core.data.rafs.blob import decompress, digest
from nydus_core.data.rafs.bootstrap import (
    CHUNK_FLAG_COMPRESSED,
    FLAG_COMPRESSION_LZ4,
    FLAG_COMPRESSION_ZSTD,
    FLAG_HASH_SHA256,
    RAFS_V5_MAGIC,
    ChunkInfo,
)
from nydus_core.data.rafs.erofs import decode_rdev
from nydus_core.data.rafs.tree import Kind, Node, ReaderContent

SB_SIZE = 8192
INODE_SIZE = 128
CHUNK_SIZE = 80
INODE_FLAG_SYMLINK = 0x1
INODE_FLAG_HARDLINK = 0x2
INODE_FLAG_XATTR = 0x4

_SB = struct.Struct("<IIIIQQQQQIIIIQ")
_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
assert _INODE.size == INODE_SIZE


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class V5Superblock:
    magic: int
    version: int
    sb_size: int
    chunk_size: int
    flags: int
    inodes_count: int
    inode_table_offset: int
    prefetch_table_offset: int
    blob_table_offset: int
    inode_table_entries: int
    prefetch_table_entries: int
    blob_table_size: int
    extended_blob_table_entries: int
    extended_blob_table_offset: int


@dataclass(frozen=True)
class V5Inode:
    offset: int
    digest: bytes
    parent: int
    ino: int
    uid: int
    gid: int
    mode: int
    size: int
    flags: int
    nlink: int
    child_index: int
    child_count: int
    rdev: int
    mtime: int
    mtime_nsec: int
    name: bytes
    symlink: bytes
    xattrs: dict[bytes, bytes]
    chunks: tuple[ChunkInfo, ...]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class RafsV5:
    """A parsed v5 bootstrap."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        if len(data) < SB_SIZE:
            raise RafsError(f"RAFS v5 bootstrap too short ({len(data)} bytes)")
        self.sb = V5Superblock(*_SB.unpack_from(data, 0))
        if self.sb.magic != RAFS_V5_MAGIC or self.sb.version != 0x500:
            raise RafsError(
                f"not a RAFS v5 bootstrap (magic {self.sb.magic:#x}, version {self.sb.version:#x})"
            )
        cs = self.sb.chunk_size
        if cs < 4096 or cs > 16 << 20 or cs & (cs - 1):
            raise RafsError(f"invalid RAFS v5 chunk size {cs}")
        raw = self._slice(self.sb.inode_table_offset, 4 * self.sb.inode_table_entries, "inode table")
        self.table = struct.unpack(f"<{self.sb.inode_table_entries}I", raw)
        self.blob_ids = self._blob_ids()
        self._cache: dict[int, V5Inode] = {}

    @classmethod
    def open(cls, path: str) -> RafsV5:
        with open(path, "rb") as f:
            return cls(f.read())

    def _slice(self, off: int, size: int, what: str) -> bytes:
        if off < 0 or size < 0 or off + size > len(self.data):
            raise RafsError(f"{what}: [{off}, {off + size}) lies outside the bootstrap; truncated or corrupt")
        return self.data[off : off + size]

    def _blob_ids(self) -> list[str]:
        raw = self._slice(self.sb.blob_table_offset, self.sb.blob_table_size, "blob table")
        ids, pos = [], 0
        while pos + 8 <= len(raw):
            end = raw.find(b"\0", pos + 8)
            end = len(raw) if end < 0 else end
            ids.append(raw[pos + 8 : end].decode("ascii", "replace"))
            pos = end + 1
        return ids

    @property
    def compressor(self) -> int:
        if self.sb.flags & FLAG_COMPRESSION_LZ4:
            return 1
        if self.sb.flags & FLAG_COMPRESSION_ZSTD:
            return 3
        return 0

    @property
    def digester(self) -> int:
        return 1 if self.sb.flags & FLAG_HASH_SHA256 else 0

    def inode(self, ino: int) -> V5Inode:
        cached = self._cache.get(ino)
        if cached is not None:
            return cached
        if not 1 <= ino <= len(self.table):
            raise RafsError(f"inode {ino} is outside the inode table ({len(self.table)} entries)")
        off = self.table[ino - 1] << 3
        what = f"v5 inode {ino}"
        f = _INODE.unpack(self._slice(off, INODE_SIZE, what))
        (dig, parent, i_ino, uid, gid, _projid, mode, size, _blocks, flags, nlink, cidx, ccount, name_size,
         sym_size, rdev, mtime_nsec, mtime) = f  # fmt: skip
        pos = off + INODE_SIZE
        name = self._slice(pos, name_size, what)
        pos += _align8(name_size)
        symlink = b""
        if flags & INODE_FLAG_SYMLINK:
            symlink = self._slice(pos, sym_size, what)
            pos += _align8(sym_size)
        xattrs: dict[bytes, bytes] = {}
        if flags & INODE_FLAG_XATTR:
            (xsize,) = struct.unpack("<Q", self._slice(pos, 8, what))
            body = self._slice(pos + 8, xsize, what)
            pos += 8 + _align8(xsize)
            p = 0
            while p + 4 <= len(body):
                (pair,) = struct.unpack_from("<I", body, p)
                kv = body[p + 4 : p + 4 + pair]
                key, _, value = kv.partition(b"\0")
                xattrs[key] = value
                p += 4 + pair
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                                     stat.S_IFIFO, stat.S_IFSOCK):  # fmt: skip
            raise RafsError(f"{what}: invalid mode {mode:#o}")
        chunks: tuple[ChunkInfo, ...] = ()
        if stat.S_ISREG(mode):  # for files child_count is the number of chunk infos that follow
            # the builder stores one chunk per chunk-size piece (holes included), so this bounds size
            want = -(-size // self.sb.chunk_size)
            if ccount != want:
                raise RafsError(f"{what}: {ccount} chunks for a {size}-byte file (expected {want})")
            raw = self._slice(pos, CHUNK_SIZE * ccount, what)
            chunks = tuple(ChunkInfo.parse(raw, i * CHUNK_SIZE) for i in range(len(raw) // CHUNK_SIZE))
            for i, c in enumerate(chunks):
                if c.blob_index >= len(self.blob_ids):
                    raise RafsError(
                        f"{what}: chunk {i} names blob {c.blob_index}, the table has {len(self.blob_ids)}"
                    )
                if c.uncompressed_size > self.sb.chunk_size or c.file_offset + c.uncompressed_size > size:
                    raise RafsError(f"{what}: chunk {i} lies outside the file")
        node = V5Inode(off, dig, parent, i_ino, uid, gid, mode, size, flags, nlink, cidx, ccount, rdev, mtime,
                       mtime_nsec, name, symlink, xattrs, chunks)  # fmt: skip
        self._cache[ino] = node
        return node

    def children(self, inode: V5Inode) -> list[V5Inode]:
        if not inode.is_dir or inode.child_count == 0:
            return []
        return [self.inode(i) for i in range(inode.child_index, inode.child_index + inode.child_count)]

    def walk(self) -> Iterator[tuple[bytes, V5Inode]]:
        root = self.inode(1)
        yield b"", root
        stack = [(b"", root, 0)]
        while stack:
            path, node, depth = stack.pop()
            if depth > 4096:
                raise RafsError("v5 directory tree too deep (loop?)")
            for child in self.children(node):
                cpath = path + b"/" + child.name if path else child.name
                yield cpath, child
                if child.is_dir:
                    stack.append((cpath, child, depth + 1))

    def read_file(self, inode: V5Inode, blob: BinaryIO) -> bytes:
        """File bytes from its chunks (holes read as zeros), each chunk's digest checked."""
        out = bytearray(inode.size)
        for i, c in enumerate(inode.chunks):
            what = f"v5 inode {inode.ino} chunk {i} (blob {self.blob_ids[c.blob_index]})"
            if c.compressed_offset > 1 << 62 or c.compressed_size > 2 * self.sb.chunk_size + 4096:
                raise RafsError(f"{what}: implausible blob range")
            try:
                blob.seek(c.compressed_offset)
                raw = blob.read(c.compressed_size)
            except OSError as exc:
                raise RafsError(f"{what}: cannot read the blob at {c.compressed_offset}: {exc}") from exc
            if len(raw) != c.compressed_size:
                raise RafsError(f"{what}: blob truncated")
            data = raw
            if c.flags & CHUNK_FLAG_COMPRESSED:
                data = decompress(self.compressor, raw, c.uncompressed_size, what)
            if digest(self.digester, data) != c.digest:
                raise DigestMismatch(f"{what}: digest mismatch")
            end = c.file_offset + len(data)
            if end > inode.size:
                raise RafsError(f"{what}: chunk ends at {end}, past the file size {inode.size}")
            out[c.file_offset : end] = data
        return bytes(out)


def tree_from_v5(image: RafsV5, blob: BinaryIO | None) -> Node:
    """The common tree model from a v5 bootstrap; files read (and verified) from `blob` lazily."""
    by_ino: dict[int, Node] = {}  # hardlinks share an inode number

    def make(ino: V5Inode) -> Node:
        found = by_ino.get(ino.ino)
        if found is not None:
            if found.is_dir:
                raise RafsError(f"directory inode {ino.ino} is reached twice (a loop in the tree)")
            return found
        node = Node(Kind(stat.S_IFMT(ino.mode)), stat.S_IMODE(ino.mode), ino.uid, ino.gid, ino.mtime,
                    ino.mtime_nsec, dict(ino.xattrs))  # fmt: skip
        if node.kind is Kind.REG:
            node.size = ino.size
            if ino.size:
                if blob is None:
                    raise RafsError("file data requested but no blob was given")
                node.content = ReaderContent(functools.partial(image.read_file, ino, blob))
        elif node.kind is Kind.SYMLINK:
            node.link_target, node.size = ino.symlink, len(ino.symlink)
        elif node.kind in (Kind.CHAR, Kind.BLOCK):
            node.rdev = decode_rdev(ino.rdev)
        by_ino[ino.ino] = node
        for child in image.children(ino):
            node.entries[child.name] = make(child)
        return node

    return make(image.inode(1))
