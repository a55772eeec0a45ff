"""Tree -> RAFS v6 bootstrap (EROFS metadata) + one native nydus blob.

Bootstrap layout (formats.md §2.1), everything 4 KiB aligned where the format asks:

    block 0   : EROFS superblock @1024, RAFS ext superblock @1152, device slots @1408
    blob table: @4096 (after the slots), then the prefetch table
    meta area : root inode first (nid 128: meta_blkaddr is one block before it), then every other
                inode in breadth-first order with its inline xattrs, inline tail or chunk indexes
    data area : directory / symlink blocks that do not fit inline (FLAT_PLAIN)
    chunk table: 80-byte entries sorted by digest

Regular files are CHUNK_BASED; each 8-byte index names blob_index+1 as the EROFS device and the
chunk's uncompressed offset / 4096 as its block, so the kernel reads a blob *device* holding the
uncompressed aligned layout. With ``compressor=none`` the blob is written exactly that way (each chunk
at compressed offset == uncompressed offset), so the blob file itself mounts as the device.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import (
    CI_HEADER_SIZE,
    COMPRESSOR_NAMES,
    COMPRESSOR_NONE,
    COMPRESSOR_ZSTD,
    DIGESTER_NAMES,
    FEATURE_ALIGNED,
    FEATURE_CAP_TAR_TOC,
    FEATURE_HAS_TAR_HEADER,
    FEATURE_HAS_TOC,
    FEATURE_INLINED_CHUNK_DIGEST,
    FEATURE_INLINED_FS_META,
    FEATURE_TARFS,
    TOC_FLAG_LZ4,
    TOC_FLAG_NONE,
    TOC_FLAG_ZSTD,
    BlobChunk,
    CiHeader,
    TocEntry,
    compress,
    digest,
    pack_ci_v1,
    tar_header,
)
from nydus_core.data.rafs.bootstrap import (
    BLOB_ENTRY_SIZE,
    CHUNK_FLAG_COMPRESSED,
    COMPRESSION_FLAGS,
    DEVT_SLOTOFF,
    DIGEST_FLAGS,
    EXT_SB_OFFSET,
    FLAG_EXPLICIT_UID_GID,
    FLAG_HAS_XATTR,
    FLAG_INLINED_CHUNK_DIGEST,
    FLAG_TARFS_MODE,
    BlobEntry,
    Bootstrap,
    ChunkInfo,
    ExtSuperblock,
)
from nydus_core.data.rafs.erofs import (
    CHUNK_FORMAT_INDEXES,
    COMPAT_RAFS_V6,
    DEVICE_SLOT_SIZE,
    DIRENT_SIZE,
    EXTENDED_INODE_SIZE,
    INCOMPAT_CHUNKED_FILE,
    INCOMPAT_DEVICE_TABLE,
    ISLOT,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    SB_OFFSET,
    DeviceSlot,
    Inode,
    Superblock,
    encode_rdev,
    file_type_of,
    xattr_body,
)
from nydus_core.data.rafs.tree import (
    WHITEOUT_PREFIX,
    FileContent,
    Kind,
    Node,
    StoredChunk,
    merge_layers,
    sorted_walk,
    tree_from_bootstrap,
    tree_from_tar,
)

BLKSZ = 4096  # uncompressed chunk alignment in blobs; also the default EROFS block size
BLKBITS = 12
PAGE = 4096  # byte alignment of the bootstrap's tables and areas, whatever the block size
ROOT_NID = 128
SEG_ALIGN = 0x80000  # blobs start on 512 KiB boundaries in the flat address space
WHITEOUT_SPECS = ("oci", "overlayfs", "none")
OVERLAY_OPAQUE = b"trusted.overlay.opaque"


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class BuildOptions:
    """What `nydus-image create` lets a user choose."""

    chunk_size: int = 1 << 20
    compressor: str = "zstd"
    digester: str = "blake3"
    whiteout_spec: str = "oci"
    prefetch: list[str] = field(default_factory=list)  # paths whose nids go to the prefetch table
    blob_inline_meta: bool = False  # also store the bootstrap in the blob (`image.boot` ToC entry)
    blkszbits: int = BLKBITS  # EROFS block size; 9 for tarfs images (tar payloads are 512-aligned)
    prefetch_skip_missing: bool = False  # a prefetch path not in the image is skipped, not an error

    def validate(self) -> None:
        cs = self.chunk_size
        if cs < 4096 or cs > 16 << 20 or cs & (cs - 1):
            raise RafsError(f"chunk size {cs:#x} must be a power of two between 4 KiB and 16 MiB")
        if self.compressor not in COMPRESSOR_NAMES:
            raise RafsError(f"unknown compressor {self.compressor!r} (none, lz4_block, zstd)")
        if self.digester not in DIGESTER_NAMES:
            raise RafsError(f"unsupported digester {self.digester!r} (blake3, sha256)")
        if self.whiteout_spec not in WHITEOUT_SPECS:
            raise RafsError(f"unknown whiteout spec {self.whiteout_spec!r} ({', '.join(WHITEOUT_SPECS)})")


# -- blob --------------------------------------------------------------------------------------------
@dataclass
class _Chunk:
    blob: BlobChunk
    digest: bytes


class BlobWriter:
    """Appends deduplicated chunks to one blob file, then its ci table, digests and ToC."""

    def __init__(self, f: BinaryIO, compressor: str, digester: str) -> None:
        self.f = f
        self.compressor = COMPRESSOR_NAMES[compressor]
        self.digester = DIGESTER_NAMES[digester]
        self.chunks: list[_Chunk] = []
        self._dedup: dict[tuple[bytes, int], _Chunk] = {}
        self._hasher = hashlib.sha256()
        self.coff = 0  # next compressed offset (= bytes written)
        self.uoff = 0  # next uncompressed, 4 KiB aligned offset
        self.entry: BlobEntry | None = None

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self._hasher.update(data)
        self.coff += len(data)

    def add(self, data: bytes) -> _Chunk:
        dig = digest(self.digester, data)
        key = (dig, len(data))
        found = self._dedup.get(key)
        if found is not None:
            return found
        if self.compressor == COMPRESSOR_NONE:
            # Place the chunk at its uncompressed offset: the blob doubles as an EROFS device.
            self._write(b"\0" * (self.uoff - self.coff))
            stored, compressed = data, False
        else:
            packed = compress(self.compressor, data)
            stored, compressed = (packed, True) if len(packed) < len(data) else (data, False)
        chunk = _Chunk(
            BlobChunk(len(self.chunks), self.coff, len(stored), self.uoff, len(data), compressed), dig
        )
        self._write(stored)
        self.uoff += _align(len(data), BLKSZ)
        self.chunks.append(chunk)
        self._dedup[key] = chunk
        return chunk

    def finish(
        self, chunk_size: int, inline_bootstrap: Callable[[BlobEntry], bytes] | None = None
    ) -> BlobEntry:
        """Write the trailing sections; returns the blob-table entry.

        The blob id is the sha256 of the whole file, or, with an inlined bootstrap (which must
        name the blob before the blob is complete), of everything before the `image.boot` section.
        """
        if self.compressor == COMPRESSOR_NONE:
            self._write(b"\0" * (self.uoff - self.coff))  # the device covers whole blocks
        data_size = self.coff
        toc: list[TocEntry] = []
        self._write(tar_header(b"image.blob", data_size))
        # like nydus-image: the section digest covers the chunk data and its tar header
        toc.append(
            TocEntry(TOC_FLAG_NONE, b"image.blob", self._hasher.copy().digest(), 0, data_size, self.uoff)
        )

        ci_raw = b"".join(pack_ci_v1(c.blob) for c in self.chunks)
        ci_comp, ci_code, ci_flag = ci_raw, COMPRESSOR_NONE, TOC_FLAG_NONE
        if self.compressor != COMPRESSOR_NONE and ci_raw:
            packed = compress(self.compressor, ci_raw)
            if len(packed) < len(ci_raw):
                ci_comp, ci_code = packed, self.compressor
                ci_flag = TOC_FLAG_ZSTD if self.compressor == COMPRESSOR_ZSTD else TOC_FLAG_LZ4
        features = (FEATURE_ALIGNED | FEATURE_INLINED_CHUNK_DIGEST | FEATURE_HAS_TAR_HEADER | FEATURE_HAS_TOC
                    | FEATURE_CAP_TAR_TOC)  # fmt: skip
        ci_offset = self.coff
        header = CiHeader(features, ci_code, len(self.chunks), ci_offset, len(ci_comp), len(ci_raw)).pack()
        self._write(ci_comp)
        self._write(header)
        self._write(tar_header(b"blob.meta", len(ci_comp) + CI_HEADER_SIZE))
        toc.append(TocEntry(ci_flag, b"blob.meta", hashlib.sha256(ci_raw).digest(), ci_offset, len(ci_comp),
                            len(ci_raw)))  # fmt: skip
        toc.append(TocEntry(TOC_FLAG_NONE, b"blob.meta.header", hashlib.sha256(header).digest(),
                            ci_offset + len(ci_comp), CI_HEADER_SIZE, CI_HEADER_SIZE))  # fmt: skip

        digests = b"".join(c.digest for c in self.chunks)
        dig_off = self.coff
        self._write(digests)
        self._write(tar_header(b"blob.digest", len(digests)))
        toc.append(TocEntry(TOC_FLAG_NONE, b"blob.digest", hashlib.sha256(digests).digest(), dig_off,
                            len(digests), len(digests)))  # fmt: skip

        entry = BlobEntry(
            blob_id=self._hasher.hexdigest(),
            chunk_size=chunk_size,
            chunk_count=len(self.chunks),
            compression_algo=self.compressor,
            digest_algo=self.digester,
            features=features | (FEATURE_INLINED_FS_META if inline_bootstrap else 0),
            compressed_size=self.coff,
            uncompressed_size=self.uoff,
            ci_compressor=ci_code,
            ci_offset=ci_offset,
            ci_compressed_size=len(ci_comp),
            ci_uncompressed_size=len(ci_raw),
        )
        if inline_bootstrap is not None:
            # The inlined copy cannot know the final size or ToC digest of the blob that holds it;
            # upstream has the same limitation and `merge --blob-sizes/--blob-toc-digests` fixes it.
            boot = inline_bootstrap(replace(entry))
            packed = compress(COMPRESSOR_ZSTD, boot)
            boot_off = self.coff
            self._write(packed)
            self._write(tar_header(b"image.boot", len(packed)))
            toc.append(TocEntry(TOC_FLAG_ZSTD, b"image.boot", hashlib.sha256(boot).digest(), boot_off,
                                len(packed), len(boot)))  # fmt: skip

        toc_raw = b"".join(e.pack() for e in toc)
        toc_hdr = tar_header(b"rafs.blob.toc", len(toc_raw))
        self._write(toc_raw)
        self._write(toc_hdr)
        self.f.flush()
        entry.compressed_size = self.coff
        entry.blob_toc_size = len(toc_raw) + len(toc_hdr)
        entry.blob_toc_digest = hashlib.sha256(toc_raw + toc_hdr).digest()
        if inline_bootstrap is None:
            entry.blob_id = self._hasher.hexdigest()  # sha256 of the whole file
        self.entry = entry
        return entry


def _read_chunks(node: Node, chunk_size: int) -> Iterator[bytes]:
    if node.size == 0 or node.content is None:
        if node.size:
            raise RafsError("regular file has a size but no content")
        return
    with node.content.open() as f:
        left = node.size
        while left:
            piece = f.read(min(chunk_size, left))
            while len(piece) < min(chunk_size, left):
                more = f.read(min(chunk_size, left) - len(piece))
                if not more:
                    raise RafsError(f"file content ended {left - len(piece)} bytes early")
                piece += more
            left -= len(piece)
            yield piece


# -- bootstrap -----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _WInode:
    """One inode being laid out."""

    node: Node
    mode: int
    entries: list[tuple[bytes, _WInode]] = field(default_factory=list)
    xattrs: bytes = b""
    data: bytes = b""  # directory blocks / symlink target
    chunks: list[tuple[int, _Chunk]] = field(default_factory=list)  # (blob index, chunk)
    nid: int = 0
    offset: int = 0
    layout: int = LAYOUT_FLAT_PLAIN
    blkaddr: int = 0
    nlink: int = 1
    parent: _WInode | None = None
    path: bytes = b""


def _dir_blocks(names: list[tuple[bytes, int, int]], blksz: int = BLKSZ) -> bytes:
    """Sorted (name, nid, file type) -> self-contained directory blocks; last block is short."""
    blocks: list[list[tuple[bytes, int, int]]] = [[]]
    used = 0
    for item in names:
        need = DIRENT_SIZE + len(item[0])
        if used + need > blksz:
            blocks.append([])
            used = 0
        blocks[-1].append(item)
        used += need
    out = bytearray()
    for i, block in enumerate(blocks):
        buf = bytearray()
        nameoff = DIRENT_SIZE * len(block)
        names_raw = bytearray()
        for name, nid, ftype in block:
            buf += struct.pack("<QHBx", nid, nameoff + len(names_raw), ftype)
            names_raw += name
        buf += names_raw
        if i + 1 < len(blocks):
            buf += b"\0" * (blksz - len(buf))
        out += buf
    return bytes(out)


def _dir_size(names: list[bytes], blksz: int = BLKSZ) -> int:
    return len(_dir_blocks([(n, 0, 0) for n in sorted(names)], blksz))


class BootstrapBuilder:
    """Lays out and serialises the EROFS/RAFS v6 metadata for a tree whose chunks are written."""

    def __init__(self, root: Node, blobs: list[BlobEntry], chunk_size: int, whiteout_spec: str,
                 file_chunks: dict[int, list[tuple[int, _Chunk]]],
                 prefetch: list[str] | None = None, blkszbits: int = BLKBITS,
                 prefetch_skip_missing: bool = False) -> None:  # fmt: skip
        self.root = root
        self.prefetch_skip_missing = prefetch_skip_missing
        self.blkszbits = blkszbits
        self.blksz = 1 << blkszbits
        self.blobs = blobs
        self.chunk_size = chunk_size
        self.whiteout_spec = whiteout_spec
        self.file_chunks = file_chunks
        self.prefetch = [p.encode() if isinstance(p, str) else p for p in prefetch or []]
        self.inodes: list[_WInode] = []
        self.by_path: dict[bytes, _WInode] = {}

    # Which entries a directory shows, markers translated per the whiteout spec.
    def _entries(self, node: Node) -> tuple[list[tuple[bytes, Node]], dict[bytes, bytes]]:
        entries = list(node.entries.items())
        xattrs = dict(node.xattrs)
        if self.whiteout_spec == "oci":
            entries += [(WHITEOUT_PREFIX + name, marker) for name, marker in node.whiteouts.items()]
            if node.opaque is not None:
                entries.append((b".wh..wh..opq", node.opaque))
        elif self.whiteout_spec == "overlayfs":
            for name, marker in node.whiteouts.items():
                if name not in node.entries:
                    dev = Node(Kind.CHAR, 0, marker.uid, marker.gid, marker.mtime, marker.mtime_nsec)
                    entries.append((name, dev))
            if node.opaque is not None:
                xattrs[OVERLAY_OPAQUE] = b"y"
        return entries, xattrs

    def _collect(self) -> None:
        seen: dict[int, _WInode] = {}
        root_w = _WInode(self.root, self.root.st_mode)
        seen[id(self.root)] = root_w
        self.by_path[b""] = root_w
        queue = deque([root_w])
        self.inodes.append(root_w)
        while queue:
            w = queue.popleft()
            entries, xattrs = self._entries(w.node)
            w.xattrs = xattr_body(xattrs)
            for name, child in sorted(entries, key=lambda e: e[0]):
                cw = seen.get(id(child))
                if cw is None:
                    cw = _WInode(child, child.st_mode, xattrs=xattr_body(child.xattrs), parent=w)
                    cw.path = w.path + b"/" + name if w.path else name
                    self.by_path[cw.path] = cw
                    seen[id(child)] = cw
                    self.inodes.append(cw)
                    if child.is_dir:
                        queue.append(cw)
                w.entries.append((name, cw))
        refs: dict[int, int] = {}
        for w in self.inodes:
            for _, c in w.entries:
                refs[id(c)] = refs.get(id(c), 0) + 1
        for w in self.inodes:
            if w.node.is_dir:
                w.nlink = 2 + sum(1 for _, c in w.entries if c.node.is_dir)
            else:
                w.nlink = refs.get(id(w), 1)
            if w.node.kind is Kind.REG:
                w.chunks = self.file_chunks.get(id(w.node), [])

    def _data_len(self, w: _WInode) -> int:
        if w.node.is_dir:
            return _dir_size([b".", b"..", *(n for n, _ in w.entries)], self.blksz)
        if w.node.kind is Kind.SYMLINK:
            return len(w.node.link_target)
        return 0

    def build(self) -> bytes:
        blksz = self.blksz
        self._collect()
        nblobs = len(self.blobs)
        slots_end = DEVT_SLOTOFF * DEVICE_SLOT_SIZE + nblobs * DEVICE_SLOT_SIZE
        blob_table_off = _align(max(slots_end, PAGE), PAGE)
        prefetch_off = blob_table_off + nblobs * BLOB_ENTRY_SIZE
        prefetch = []
        for want in self.prefetch:
            w = self.by_path.get(want.strip(b"/"))
            if w is None:
                if self.prefetch_skip_missing:
                    continue
                raise RafsError(f"prefetch path {want.decode(errors='replace')} is not in the image")
            prefetch.append(w)
        # As nydus-image does: the meta area starts at the first free block and the root inode one
        # block later, so the root nid is 128 and no nid below it is ever used.
        meta_blkaddr = _align(prefetch_off + 4 * len(prefetch), PAGE) // blksz
        root_off = meta_blkaddr * blksz + PAGE

        # Pass 1: inode positions (nids), inline decisions; full data blocks deferred.
        pos = root_off
        deferred: list[tuple[_WInode, int]] = []
        for w in self.inodes:
            head = EXTENDED_INODE_SIZE + len(w.xattrs)
            dlen = self._data_len(w)
            extra = 0
            if w.node.kind is Kind.REG:
                w.layout = LAYOUT_CHUNK_BASED
                extra = (-(pos + head) % 8) + 8 * len(w.chunks)
            elif dlen:
                tail = dlen % blksz
                if tail and head + tail <= blksz:
                    w.layout = LAYOUT_FLAT_INLINE
                    if pos % blksz + head + tail > blksz:
                        pos = _align(pos, blksz)
                    extra = tail
                    if dlen - tail:
                        deferred.append((w, (dlen - tail) // blksz))
                else:
                    w.layout = LAYOUT_FLAT_PLAIN
                    deferred.append((w, _align(dlen, blksz) // blksz))
            if w.layout != LAYOUT_FLAT_INLINE and head <= blksz and pos % blksz + head > blksz:
                pos = _align(pos, blksz)
            if w.layout == LAYOUT_CHUNK_BASED:
                extra = (-(pos + head) % 8) + 8 * len(w.chunks)
            w.offset = pos
            w.nid = (pos - meta_blkaddr * blksz) // ISLOT
            pos = _align(pos + head + extra, ISLOT)
        if self.inodes[0].nid != ROOT_NID:
            raise RafsError(f"internal: root nid {self.inodes[0].nid} != {ROOT_NID}")
        block = _align(pos, blksz) // blksz
        for w, nblocks in deferred:
            w.blkaddr = block
            block += nblocks
        chunk_table_off = _align(block * blksz, PAGE)

        # Chunk table: one entry per distinct (blob, chunk), sorted by digest.
        distinct: dict[tuple[int, int], tuple[int, _Chunk]] = {}
        for w in self.inodes:
            for bi, ch in w.chunks:
                distinct[(bi, ch.blob.index)] = (bi, ch)
        infos = [
            ChunkInfo(
                ch.digest,
                bi,
                CHUNK_FLAG_COMPRESSED if ch.blob.compressed else 0,
                ch.blob.compressed_size,
                ch.blob.uncompressed_size,
                ch.blob.compressed_offset,
                ch.blob.uncompressed_offset,
                0,
                ch.blob.index,
                ch.blob.aux,
            )
            for bi, ch in distinct.values()
        ]
        infos.sort(key=lambda c: (c.digest, c.blob_index, c.index))
        chunk_table = b"".join(c.pack() for c in infos)
        total = _align(chunk_table_off + len(chunk_table), PAGE)
        out = bytearray(total)

        # Pass 2: serialise inodes and data.
        for i, w in enumerate(self.inodes):
            data = b""
            if w.node.is_dir:
                parent = w.parent or w
                items = [(b".", w.nid, file_type_of(w.mode)), (b"..", parent.nid, file_type_of(parent.mode))]
                items += [(n, c.nid, file_type_of(c.mode)) for n, c in w.entries]
                data = _dir_blocks(sorted(items, key=lambda t: t[0]), blksz)
            elif w.node.kind is Kind.SYMLINK:
                data = w.node.link_target
            n = w.node
            inode = Inode(extended=True, layout=w.layout, mode=w.mode, nlink=w.nlink, ino=i + 1, uid=n.uid,
                          gid=n.gid, mtime=n.mtime, mtime_nsec=n.mtime_nsec)  # fmt: skip
            inode.xattr_icount = 0 if not w.xattrs else 1 + (len(w.xattrs) - 12) // 4
            if w.node.kind is Kind.REG:
                inode.size = w.node.size
                inode.u = CHUNK_FORMAT_INDEXES | (self.chunk_size.bit_length() - 1 - self.blkszbits)
            elif w.node.kind in (Kind.CHAR, Kind.BLOCK):
                inode.u = encode_rdev(*w.node.rdev)
            elif data:
                inode.size = len(data)
                inline_only = w.layout == LAYOUT_FLAT_INLINE and len(data) < blksz
                # nydus-image records the meta block holding an all-inline tail; the kernel ignores it
                inode.u = w.offset // blksz if inline_only else w.blkaddr
            body = inode.pack() + w.xattrs
            out[w.offset : w.offset + len(body)] = body
            end = w.offset + len(body)
            if w.layout == LAYOUT_CHUNK_BASED:
                end += -end % 8
                for bi, ch in w.chunks:
                    ci = ch.blob.index
                    addr = struct.pack("<HHI", ci & 0xFFFF, (bi + 1) | ((ci >> 16) << 8),
                                       ch.blob.uncompressed_offset // blksz)  # fmt: skip
                    out[end : end + 8] = addr
                    end += 8
            elif data:
                tail = len(data) % blksz if w.layout == LAYOUT_FLAT_INLINE else 0
                full = data[: len(data) - tail]
                if full:
                    start = w.blkaddr * blksz
                    out[start : start + len(full)] = full
                if tail:
                    out[end : end + tail] = data[len(data) - tail :]
        out[chunk_table_off : chunk_table_off + len(chunk_table)] = chunk_table

        # Block 0 and the tables.
        has_xattr = any(w.xattrs for w in self.inodes)
        flags = FLAG_EXPLICIT_UID_GID | (FLAG_HAS_XATTR if has_xattr else 0)
        tarfs = any(b.features & FEATURE_TARFS for b in self.blobs)
        flags |= FLAG_TARFS_MODE if tarfs else FLAG_INLINED_CHUNK_DIGEST
        comp = self.blobs[0].compression_algo if self.blobs else COMPRESSOR_NONE
        dig = self.blobs[0].digest_algo if self.blobs else DIGESTER_NAMES["blake3"]
        flags |= COMPRESSION_FLAGS[comp] | DIGEST_FLAGS[dig]
        ext = ExtSuperblock(flags, blob_table_off, nblobs * BLOB_ENTRY_SIZE, self.chunk_size, chunk_table_off,
                            len(chunk_table), prefetch_off if prefetch else 0, 4 * len(prefetch))  # fmt: skip
        table = struct.pack(f"<{len(prefetch)}I", *(w.nid for w in prefetch))
        out[prefetch_off : prefetch_off + len(table)] = table
        mapped = _align(total, SEG_ALIGN) // blksz
        slots = []
        for i, b in enumerate(self.blobs):
            b.blob_index = i
            blocks = b.uncompressed_size // blksz
            slots.append(DeviceSlot(b.blob_id.encode(), blocks, mapped))
            mapped += _align(blocks * blksz, SEG_ALIGN) // blksz
        sb = Superblock(
            feature_compat=COMPAT_RAFS_V6,
            blkszbits=self.blkszbits,
            root_nid=ROOT_NID,
            inos=len(self.inodes),
            blocks=sum(s.blocks for s in slots) or total // blksz,
            meta_blkaddr=meta_blkaddr,
            feature_incompat=INCOMPAT_CHUNKED_FILE | (INCOMPAT_DEVICE_TABLE if nblobs else 0),
            extra_devices=nblobs,
            devt_slotoff=DEVT_SLOTOFF if nblobs else 0,
        )
        out[SB_OFFSET : SB_OFFSET + 128] = sb.pack()
        out[EXT_SB_OFFSET : EXT_SB_OFFSET + 256] = ext.pack()
        for i, s in enumerate(slots):
            off = (DEVT_SLOTOFF + i) * DEVICE_SLOT_SIZE
            out[off : off + DEVICE_SLOT_SIZE] = s.pack()
        for i, b in enumerate(self.blobs):
            off = blob_table_off + i * BLOB_ENTRY_SIZE
            out[off : off + BLOB_ENTRY_SIZE] = b.pack()
        return bytes(out)


def data_order(walked: list[tuple[bytes, Node]], prefetch: Sequence[str | bytes] = ()) -> list[Node]:
    """The regular files in the order their data goes into the blob.

    Files the prefetch list names (a file, or every file below a named directory) come first, in
    the list's order, then the others by path. A prefetch at mount then reads one contiguous
    region at the blob's start in a few large requests, instead of chunks scattered over the
    whole blob (upstream's builder lays prefetch files out the same way). Hard links count once.
    """
    files = [(path, node) for path, node in walked if node.kind is Kind.REG]
    rank: dict[bytes, int] = {}
    for i, want in enumerate(prefetch):
        key = (want.encode() if isinstance(want, str) else want).strip(b"/")
        rank.setdefault(key, i)
    if rank:
        def position(path: bytes) -> tuple[int, int]:
            best = len(rank)
            probe = path
            while True:  # the file itself, then each ancestor directory
                best = min(best, rank.get(probe, best))
                if not probe:
                    return (best, 0)
                probe = probe.rpartition(b"/")[0]

        files.sort(key=lambda item: position(item[0]))  # stable: by path within a rank
    order: list[Node] = []
    done: set[int] = set()
    for _, node in files:
        if id(node) not in done:
            done.add(id(node))
            order.append(node)
    return order


@dataclass
class BuildResult:
    bootstrap: bytes
    blob: BlobEntry | None  # the blob this build wrote, if any
    blobs: list[BlobEntry] = field(default_factory=list)  # the bootstrap's whole blob table


def build(root: Node, blob_out: BinaryIO | None, options: BuildOptions | None = None) -> BuildResult:
    """Write the tree's new file data into `blob_out` and return the bootstrap.

    Files that carry `stored` chunks (taken from existing bootstraps, e.g. by merge) are referenced
    where they are; their blobs join the blob table in first-use order, the new blob goes last.
    With no new file data nothing is written to `blob_out`.
    """
    opts = options or BuildOptions()
    opts.validate()
    writer = BlobWriter(blob_out, opts.compressor, opts.digester) if blob_out is not None else None
    order = data_order(sorted_walk(root), opts.prefetch)
    blob_index: dict[str, int] = {}
    blobs: list[BlobEntry] = []
    file_chunks: dict[int, list[tuple[int, _Chunk]]] = {}
    fresh: list[Node] = []
    for node in order:
        if node.size == 0:
            continue
        if node.stored is None:
            fresh.append(node)
            continue
        refs = []
        for sc in node.stored:
            if sc.blob.chunk_size != opts.chunk_size:
                raise RafsError(f"blob {sc.blob.blob_id} uses chunk size {sc.blob.chunk_size:#x}, "
                                f"this image {opts.chunk_size:#x}; layers must agree")  # fmt: skip
            bi = blob_index.get(sc.blob.blob_id)
            if bi is None:
                bi = blob_index[sc.blob.blob_id] = len(blobs)
                blobs.append(replace(sc.blob, blob_index=bi))
            refs.append((bi, _Chunk(sc.chunk, sc.digest)))
        file_chunks[id(node)] = refs
    new_index = len(blobs)
    for node in fresh:
        if writer is None:
            raise RafsError("the tree has new file data but no blob output was given")
        file_chunks[id(node)] = [
            (new_index, writer.add(piece)) for piece in _read_chunks(node, opts.chunk_size)
        ]

    def bootstrap_for(table: list[BlobEntry]) -> bytes:
        return BootstrapBuilder(root, table, opts.chunk_size, opts.whiteout_spec, file_chunks, opts.prefetch,
                                opts.blkszbits, opts.prefetch_skip_missing).build()  # fmt: skip

    new_blob: BlobEntry | None = None
    if writer is not None and writer.chunks:
        inline = (lambda e: bootstrap_for([*blobs, e])) if opts.blob_inline_meta else None
        new_blob = writer.finish(opts.chunk_size, inline)
        blobs.append(new_blob)
    return BuildResult(bootstrap_for(blobs), new_blob, blobs)


def build_to_paths(root: Node, bootstrap_path: str, blob_path: str | None, blob_dir: str | None,
                   options: BuildOptions | None = None) -> BuildResult:  # fmt: skip
    """`create`'s file handling: the blob goes to `blob_path`, or into `blob_dir` named by its id.

    Outputs are written under temporary names next to their targets and renamed at the end, so a
    failed build (bad input, full disk) leaves neither a partial blob nor a partial bootstrap.
    """
    tmp_blob = (
        (blob_path + ".tmp") if blob_path else (os.path.join(blob_dir, ".blob.tmp") if blob_dir else None)
    )
    tmp_boot = bootstrap_path + ".tmp"
    try:
        if tmp_blob is None:
            result = build(root, None, options)
        else:
            with open(tmp_blob, "wb") as f:
                result = build(root, f, options)
        with open(tmp_boot, "wb") as f:
            f.write(result.bootstrap)
        if tmp_blob is not None:
            if blob_path is not None:
                os.replace(tmp_blob, blob_path)
            elif result.blob is None:
                os.unlink(tmp_blob)
            else:
                assert blob_dir is not None
                os.replace(tmp_blob, os.path.join(blob_dir, result.blob.blob_id))
        os.replace(tmp_boot, bootstrap_path)
    except BaseException:
        for leftover in (tmp_blob, tmp_boot):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
        raise
    return result


def merge_bootstraps(
    layers: list[Bootstrap],
    *,
    whiteout_spec: str = "oci",
    prefetch: list[str] | None = None,
    blob_digests: list[str] | None = None,
    blob_sizes: list[int] | None = None,
    blob_toc_digests: list[str] | None = None,
    prefetch_skip_missing: bool = False,
    keep_markers: bool = False,
) -> BuildResult:
    """`nydus-image merge`: layer bootstraps (lowest first) -> one image bootstrap, no data copied.

    OCI whiteouts of each layer are applied (and, with `keep_markers`, kept for the layers the
    result will be stacked on); every layer's blob stays a blob-table entry. The
    optional lists (one item per layer, each layer having exactly one blob) replace blob ids with
    the OCI layer digests, and fill in the final blob sizes / ToC digests an inlined bootstrap
    could not know.
    """
    if not layers:
        raise RafsError("merge needs at least one layer bootstrap")
    for name, values in (("--blob-digests", blob_digests), ("--blob-sizes", blob_sizes),
                         ("--blob-toc-digests", blob_toc_digests)):  # fmt: skip
        if values is not None and len(values) != len(layers):
            raise RafsError(f"{name} has {len(values)} items for {len(layers)} layers")
    chunk_size = layers[0].ext.chunk_size
    for i, bs in enumerate(layers):
        if bs.ext.chunk_size != chunk_size:
            raise RafsError(f"layer {i} uses chunk size {bs.ext.chunk_size:#x}, layer 0 {chunk_size:#x}")
        if any(v is not None for v in (blob_digests, blob_sizes, blob_toc_digests)) and len(bs.blobs) > 1:
            raise RafsError(f"layer {i} has {len(bs.blobs)} blobs; per-layer blob options need exactly one")
        for blob in bs.blobs:
            if blob_digests is not None:
                digest_hex = blob_digests[i].removeprefix("sha256:")
                if len(digest_hex) != 64:
                    raise RafsError(f"blob digest {blob_digests[i]!r} is not a sha256 digest")
                blob.blob_id = digest_hex
            if blob_sizes is not None:
                blob.compressed_size = blob_sizes[i]
            if blob_toc_digests is not None:
                blob.blob_toc_digest = bytes.fromhex(blob_toc_digests[i].removeprefix("sha256:"))
    trees = [tree_from_bootstrap(bs, markers=True) for bs in layers]
    merged = merge_layers(trees, keep_markers=keep_markers)
    first = next((b for bs in layers for b in bs.blobs), None)
    opts = BuildOptions(
        chunk_size=chunk_size,
        compressor=_name_of(COMPRESSOR_NAMES, first.compression_algo) if first else "none",
        digester=_name_of(DIGESTER_NAMES, first.digest_algo) if first else "blake3",
        whiteout_spec=whiteout_spec,
        prefetch=prefetch or [],
        prefetch_skip_missing=prefetch_skip_missing,
    )
    return build(merged, None, opts)


def _name_of(table: dict[str, int], code: int) -> str:
    for name, value in table.items():
        if value == code:
            return name
    raise RafsError(f"unknown algorithm code {code}")


def build_tarfs(
    tar_path: str, options: BuildOptions | None = None, blob_id: str | None = None
) -> BuildResult:
    """`--type tar-tarfs`: a metadata-only bootstrap whose chunks point into the layer tar itself.

    The uncompressed tar is the blob (mount with ``-o device=LAYER.tar``); EROFS blocks are 512
    bytes so every payload offset is a block address. Nothing is copied, and no chunk digests are
    computed (nydus tarfs images carry none; the layer digest covers the tar).
    """
    opts = replace(options or BuildOptions(), compressor="none", digester="sha256", blkszbits=9)
    opts.validate()
    root = tree_from_tar(tar_path)
    size = os.path.getsize(tar_path)
    if blob_id is None:
        h = hashlib.sha256()
        with open(tar_path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                h.update(piece)
        blob_id = h.hexdigest()
    entry = BlobEntry(blob_id=blob_id.removeprefix("sha256:"), chunk_size=opts.chunk_size, compression_algo=0,
                      digest_algo=DIGESTER_NAMES["sha256"], features=FEATURE_CAP_TAR_TOC | FEATURE_TARFS,
                      compressed_size=size, uncompressed_size=size)  # fmt: skip
    index = 0
    seen: set[int] = set()
    for _, node in sorted_walk(root):
        if node.kind is not Kind.REG or not node.size or id(node) in seen:
            continue
        seen.add(id(node))
        content = node.content
        if not isinstance(content, FileContent) or os.path.abspath(content.path) != os.path.abspath(tar_path):
            raise RafsError("tarfs needs an uncompressed tar: file payloads must be ranges of it")
        stored = []
        for off in range(0, node.size, opts.chunk_size):
            length = min(opts.chunk_size, node.size - off)
            at = content.offset + off
            stored.append(StoredChunk(entry, BlobChunk(index, at, length, at, length, False), b"\0" * 32))
            index += 1
        node.stored = tuple(stored)
    entry.chunk_count = index
    return build(root, None, opts)
