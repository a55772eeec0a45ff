"""EROFS on-disk structures: parse and pack (formats.md §1).

The reader here is deliberately strict: every offset it follows is bounds-checked so that a
truncated or corrupt image gives a `RafsError` naming the structure, never an `IndexError` or a
silent wrong answer. The same dataclasses pack themselves so the writer shares one definition of
each field.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import crc32c as _crc32c

from nydus_core.data.rafs import RafsError

EROFS_MAGIC = 0xE0F5E1E2
SB_OFFSET = 1024
SB_SIZE = 128
ISLOT = 32  # nid unit: every inode starts on a 32-byte boundary

COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2
COMPAT_RAFS_V6 = 0x40000000

INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8
# Bits this reader understands; compressed images (LZ4_0PADDING etc.) are out of scope.
INCOMPAT_SUPPORTED = INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE | 0x1

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFFFFFF

DIRENT_SIZE = 12
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = range(8)

_FT_BY_IFMT = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_LNK,
}

# Short xattr name prefixes by e_name_index.
XATTR_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}


def file_type_of(mode: int) -> int:
    """Dirent file type for an st_mode."""
    return _FT_BY_IFMT.get(stat.S_IFMT(mode), FT_UNKNOWN)


def crc32c_raw(data: bytes) -> int:
    """CRC-32C with init 0xFFFFFFFF and *no* final inversion, as EROFS stores it."""
    return _crc32c.crc32c(data) ^ 0xFFFFFFFF


def encode_rdev(major: int, minor: int) -> int:
    """Linux "new" dev_t encoding that EROFS keeps in i_u."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(rdev: int) -> tuple[int, int]:
    """Inverse of `encode_rdev` for 32-bit values."""
    major = (rdev >> 8) & 0xFFF
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return major, minor


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """Pick the longest short prefix for a full xattr name; index 0 is not mountable."""
    best = (0, name)
    for index, prefix in XATTR_PREFIXES.items():
        if name.startswith(prefix) and (best[0] == 0 or len(prefix) > len(XATTR_PREFIXES[best[0]])):
            best = (index, name[len(prefix) :])
    return best


_SB = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
assert _SB.size == SB_SIZE


@dataclass
class Superblock:
    """The 128-byte EROFS superblock at byte 1024."""

    magic: int = EROFS_MAGIC
    checksum: int = 0
    feature_compat: int = 0
    blkszbits: int = 12
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = b"\0" * 16
    volume_name: bytes = b"\0" * 16
    feature_incompat: int = 0
    u1: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    xattr_filter_reserved: int = 0
    reserved: bytes = b"\0" * 23

    @property
    def blksz(self) -> int:
        return 1 << self.blkszbits

    @classmethod
    def parse(cls, image: bytes) -> Superblock:
        if len(image) < SB_OFFSET + SB_SIZE:
            raise RafsError(f"image too short for an EROFS superblock ({len(image)} bytes)")
        sb = cls(*_SB.unpack_from(image, SB_OFFSET))
        if sb.magic != EROFS_MAGIC:
            raise RafsError(f"bad EROFS magic {sb.magic:#x} at offset {SB_OFFSET} (want {EROFS_MAGIC:#x})")
        if not 9 <= sb.blkszbits <= 16:
            raise RafsError(f"unsupported EROFS block size bits {sb.blkszbits}")
        if sb.dirblkbits != 0:
            raise RafsError(f"unsupported EROFS dirblkbits {sb.dirblkbits}")
        return sb

    def pack(self) -> bytes:
        return _SB.pack(
            self.magic, self.checksum, self.feature_compat, self.blkszbits, self.sb_extslots,
            self.root_nid, self.inos, self.build_time, self.build_time_nsec, self.blocks,
            self.meta_blkaddr, self.xattr_blkaddr, self.uuid, self.volume_name, self.feature_incompat,
            self.u1, self.extra_devices, self.devt_slotoff, self.dirblkbits, self.xattr_prefix_count,
            self.xattr_prefix_start, self.packed_nid, self.xattr_filter_reserved, self.reserved,
        )  # fmt: skip


def superblock_checksum(block0: bytes, blksz: int) -> int:
    """crc32c over block 0 from the superblock on, with the checksum field zeroed."""
    end = blksz if blksz > SB_OFFSET else SB_OFFSET + blksz
    data = bytearray(block0[SB_OFFSET:end])
    data[4:8] = b"\0\0\0\0"
    return crc32c_raw(bytes(data))


_SLOT = struct.Struct("<64sII56x")
DEVICE_SLOT_SIZE = 128
assert _SLOT.size == DEVICE_SLOT_SIZE


@dataclass(frozen=True)
class DeviceSlot:
    """One extra device (a nydus blob): its tag, size in blocks and flat-address start."""

    tag: bytes
    blocks: int
    mapped_blkaddr: int

    @classmethod
    def parse(cls, buf: bytes, off: int) -> DeviceSlot:
        tag, blocks, mapped = _SLOT.unpack_from(buf, off)
        return cls(tag.rstrip(b"\0"), blocks, mapped)

    def pack(self) -> bytes:
        if len(self.tag) > 64:
            raise RafsError(f"device tag longer than 64 bytes: {self.tag!r}")
        return _SLOT.pack(self.tag, self.blocks, self.mapped_blkaddr)


_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64
assert _COMPACT.size == COMPACT_INODE_SIZE and _EXTENDED.size == EXTENDED_INODE_SIZE


@dataclass
class Inode:
    """An inode as read from (or to be written to) the meta area."""

    nid: int = 0
    extended: bool = True
    layout: int = LAYOUT_FLAT_PLAIN
    xattr_icount: int = 0
    mode: int = 0
    nlink: int = 1
    size: int = 0
    u: int = 0  # raw_blkaddr / rdev / chunk format, by layout and type
    ino: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    offset: int = field(default=0, compare=False)  # absolute byte offset in the image

    @property
    def inode_size(self) -> int:
        return EXTENDED_INODE_SIZE if self.extended else COMPACT_INODE_SIZE

    @property
    def xattr_size(self) -> int:
        return 0 if self.xattr_icount == 0 else 12 + 4 * (self.xattr_icount - 1)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def rdev(self) -> tuple[int, int]:
        if stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode):
            return decode_rdev(self.u)
        return (0, 0)

    def pack(self) -> bytes:
        fmt = (1 if self.extended else 0) | (self.layout << 1)
        if self.extended:
            return _EXTENDED.pack(
                fmt, self.xattr_icount, self.mode, 0, self.size, self.u, self.ino, self.uid, self.gid,
                self.mtime, self.mtime_nsec, self.nlink, b"\0" * 16,
            )  # fmt: skip
        return _COMPACT.pack(
            fmt, self.xattr_icount, self.mode, self.nlink, self.size, 0, self.u, self.ino, self.uid,
            self.gid, 0,
        )  # fmt: skip


@dataclass(frozen=True)
class Dirent:
    """A directory entry: name bytes, target nid and EROFS file type."""

    name: bytes
    nid: int
    file_type: int


@dataclass(frozen=True)
class ChunkIndex:
    """One CHUNK_BASED entry; for a block map, `device_id` is 0 and `advise` is 0."""

    advise: int
    device_id: int
    blkaddr: int


def xattr_entry(index: int, suffix: bytes, value: bytes) -> bytes:
    """One inline/shared xattr entry, padded to 4 bytes."""
    if len(suffix) > 255 or len(value) > 0xFFFF:
        raise RafsError(f"xattr too large for EROFS: name {suffix!r} value {len(value)} bytes")
    raw = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
    return raw + b"\0" * (-len(raw) % 4)


def xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    """Inline xattr body (header + entries) for an inode; empty when there are none."""
    if not xattrs:
        return b""
    out = bytearray(12)  # name filter 0 = rules nothing out; no shared xattrs
    for name in sorted(xattrs):
        index, suffix = split_xattr_name(name)
        if index == 0:
            raise RafsError(f"xattr {name!r} has no EROFS short prefix (user./trusted./security./system.)")
        out += xattr_entry(index, suffix, xattrs[name])
    return bytes(out)


class ErofsImage:
    """Read-only view of an EROFS image held in memory (bootstraps are metadata-sized)."""

    def __init__(self, data: bytes, *, verify_checksum: bool = True) -> None:
        self.data = data
        self.sb = Superblock.parse(data)
        self.blksz = self.sb.blksz
        if self.sb.feature_incompat & ~INCOMPAT_SUPPORTED:
            raise RafsError(f"EROFS image uses unsupported incompat features {self.sb.feature_incompat:#x}")
        if verify_checksum and self.sb.feature_compat & COMPAT_SB_CHKSUM:
            want = superblock_checksum(self._slice(0, max(self.blksz, SB_OFFSET + self.blksz),
                                                   "block 0"), self.blksz)  # fmt: skip
            if want != self.sb.checksum:
                raise RafsError(
                    f"EROFS superblock checksum mismatch: stored {self.sb.checksum:#010x}, "
                    f"computed {want:#010x}"
                )
        self.devices = self._read_devices()

    @classmethod
    def open(cls, path: str) -> ErofsImage:
        with open(path, "rb") as f:
            return cls(f.read())

    # -- low level ---------------------------------------------------------------------------------
    def _slice(self, off: int, size: int, what: str) -> bytes:
        if off < 0 or size < 0 or off + size > len(self.data):
            raise RafsError(
                f"{what}: range [{off}, {off + size}) lies outside the image ({len(self.data)} bytes); "
                "truncated or corrupt"
            )
        return self.data[off : off + size]

    def _read_devices(self) -> list[DeviceSlot]:
        n = self.sb.extra_devices
        if n and not self.sb.feature_incompat & INCOMPAT_DEVICE_TABLE:
            raise RafsError("superblock lists extra devices without the DEVICE_TABLE feature")
        base = self.sb.devt_slotoff * DEVICE_SLOT_SIZE
        raw = self._slice(base, n * DEVICE_SLOT_SIZE, "device table")
        return [DeviceSlot.parse(raw, i * DEVICE_SLOT_SIZE) for i in range(n)]

    def nid_offset(self, nid: int) -> int:
        return self.sb.meta_blkaddr * self.blksz + nid * ISLOT

    # -- inodes ------------------------------------------------------------------------------------
    def inode(self, nid: int) -> Inode:
        off = self.nid_offset(nid)
        head = self._slice(off, 2, f"inode nid {nid}")
        (fmt,) = struct.unpack("<H", head)
        if fmt & ~0xF:
            raise RafsError(f"inode nid {nid}: unknown i_format bits {fmt:#x}")
        layout = (fmt >> 1) & 0x7
        if fmt & 1:
            raw = self._slice(off, EXTENDED_INODE_SIZE, f"inode nid {nid}")
            (_, icount, mode, _, size, u, ino, uid, gid, mtime, mtime_ns, nlink, _) = _EXTENDED.unpack(raw)
            inode = Inode(nid, True, layout, icount, mode, nlink, size, u, ino, uid, gid, mtime, mtime_ns,
                          off)  # fmt: skip
        else:
            raw = self._slice(off, COMPACT_INODE_SIZE, f"inode nid {nid}")
            (_, icount, mode, nlink, size, _, u, ino, uid, gid, _) = _COMPACT.unpack(raw)
            inode = Inode(nid, False, layout, icount, mode, nlink, size, u, ino, uid, gid,
                          self.sb.build_time, self.sb.build_time_nsec, off)  # fmt: skip
        if layout in (LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT):
            raise RafsError(f"inode nid {nid}: compressed layouts are not supported")
        if layout not in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED):
            raise RafsError(f"inode nid {nid}: unknown data layout {layout}")
        if stat.S_IFMT(mode) not in _FT_BY_IFMT:
            raise RafsError(f"inode nid {nid}: invalid mode {mode:#o}")
        return inode

    @property
    def root(self) -> Inode:
        return self.inode(self.sb.root_nid)

    # -- xattrs ------------------------------------------------------------------------------------
    def _parse_xattr_entry(self, off: int, what: str) -> tuple[bytes, bytes, int]:
        name_len, index, value_size = struct.unpack("<BBH", self._slice(off, 4, what))
        body = self._slice(off + 4, name_len + value_size, what)
        if index & 0x80:
            raise RafsError(f"{what}: long xattr name prefixes are not supported")
        prefix = XATTR_PREFIXES.get(index)
        if prefix is None:
            raise RafsError(f"{what}: unknown xattr name index {index}")
        size = 4 + name_len + value_size
        return prefix + body[:name_len], body[name_len:], size + (-size % 4)

    def xattrs(self, inode: Inode) -> dict[bytes, bytes]:
        """Every xattr of the inode, inline and shared, by full name."""
        if inode.xattr_icount == 0:
            return {}
        what = f"xattrs of nid {inode.nid}"
        start = inode.offset + inode.inode_size
        end = start + inode.xattr_size
        header = self._slice(start, 12, what)
        shared_count = header[4]
        result: dict[bytes, bytes] = {}
        pos = start + 12
        for i in range(shared_count):
            (xid,) = struct.unpack("<I", self._slice(pos + 4 * i, 4, what))
            name, value, _ = self._parse_xattr_entry(
                self.sb.xattr_blkaddr * self.blksz + xid * 4, f"shared xattr {xid} of nid {inode.nid}"
            )
            result[name] = value
        pos += 4 * shared_count
        while pos < end:
            name, value, size = self._parse_xattr_entry(pos, what)
            result[name] = value
            pos += size
        if pos != end:
            raise RafsError(f"{what}: entries overrun the xattr body ({pos} > {end})")
        return result

    # -- data --------------------------------------------------------------------------------------
    def read_flat(self, inode: Inode) -> bytes:
        """Whole content of a FLAT_PLAIN / FLAT_INLINE inode from the primary device."""
        size = inode.size
        what = f"data of nid {inode.nid}"
        if inode.layout == LAYOUT_FLAT_PLAIN:
            if size == 0:
                return b""
            return self._slice(inode.u * self.blksz, size, what)
        if inode.layout != LAYOUT_FLAT_INLINE:
            raise RafsError(f"nid {inode.nid}: layout {inode.layout} is not flat")
        tail = size % self.blksz
        full = size - tail
        if tail == 0:
            # The kernel would treat the last full block as tail; no writer produces this.
            raise RafsError(f"nid {inode.nid}: FLAT_INLINE with a block-aligned size {size}")
        head = self._slice(inode.u * self.blksz, full, what) if full else b""
        tail_off = inode.offset + inode.inode_size + inode.xattr_size
        if tail_off // self.blksz != (tail_off + tail - 1) // self.blksz:
            raise RafsError(f"nid {inode.nid}: inline data crosses a block boundary")
        return head + self._slice(tail_off, tail, what)

    def chunk_bits(self, inode: Inode) -> int:
        return self.sb.blkszbits + (inode.u & CHUNK_FORMAT_BLKBITS_MASK)

    def chunk_indexes(self, inode: Inode, chunk_size: int | None = None) -> list[ChunkIndex]:
        """CHUNK_BASED entries; `chunk_size` overrides the inode's (RAFS takes it from its ext SB)."""
        if inode.layout != LAYOUT_CHUNK_BASED:
            raise RafsError(f"nid {inode.nid}: not a chunk-based inode")
        if inode.u & ~0x3F:
            raise RafsError(f"nid {inode.nid}: unknown chunk format bits {inode.u:#x}")
        csize = chunk_size or (1 << self.chunk_bits(inode))
        count = -(-inode.size // csize)
        base = inode.offset + inode.inode_size + inode.xattr_size
        what = f"chunk indexes of nid {inode.nid}"
        if inode.u & CHUNK_FORMAT_INDEXES:
            base += -base % 8
            raw = self._slice(base, 8 * count, what)
            return [ChunkIndex(*struct.unpack_from("<HHI", raw, 8 * i)) for i in range(count)]
        base += -base % 4
        raw = self._slice(base, 4 * count, what)
        return [ChunkIndex(0, 0, struct.unpack_from("<I", raw, 4 * i)[0]) for i in range(count)]

    def read_chunked(self, inode: Inode, devices: list[bytes]) -> bytes:
        """Content of a CHUNK_BASED inode whose devices are plain (uncompressed) images.

        `devices[k]` is extra device k+1 (mount option order); device 0 is this image.
        """
        csize = 1 << self.chunk_bits(inode)
        out = bytearray()
        for i, idx in enumerate(self.chunk_indexes(inode)):
            want = min(csize, inode.size - i * csize)
            if idx.blkaddr == NULL_ADDR:
                out += b"\0" * want
                continue
            dev = self.data if idx.device_id == 0 else self._device(devices, idx.device_id)
            start = idx.blkaddr * self.blksz
            piece = dev[start : start + want]
            if len(piece) != want:
                raise RafsError(f"nid {inode.nid}: chunk {i} lies outside device {idx.device_id}")
            out += piece
        return bytes(out)

    def _device(self, devices: list[bytes], device_id: int) -> bytes:
        mask = (1 << (len(self.devices)).bit_length()) - 1 if self.devices else 0
        dev = device_id & mask
        if not 1 <= dev <= len(devices):
            raise RafsError(f"chunk refers to device {device_id} but {len(devices)} device(s) given")
        return devices[dev - 1]

    def readlink(self, inode: Inode) -> bytes:
        if not inode.is_lnk:
            raise RafsError(f"nid {inode.nid} is not a symlink")
        return self.read_flat(inode)

    # -- directories -------------------------------------------------------------------------------
    def readdir(self, inode: Inode) -> list[Dirent]:
        """All entries including "." and "..", in on-disk order."""
        if not inode.is_dir:
            raise RafsError(f"nid {inode.nid} is not a directory")
        data = self.read_flat(inode)
        entries: list[Dirent] = []
        for bstart in range(0, len(data), self.blksz):
            block = data[bstart : bstart + self.blksz]
            entries.extend(self._parse_dir_block(block, inode.nid, bstart // self.blksz))
        return entries

    def _parse_dir_block(self, block: bytes, nid: int, bno: int) -> list[Dirent]:
        what = f"directory nid {nid} block {bno}"
        if len(block) < DIRENT_SIZE:
            raise RafsError(f"{what}: too short for a dirent")
        nameoff0 = struct.unpack_from("<H", block, 8)[0]
        if (
            nameoff0 < DIRENT_SIZE
            or nameoff0 >= self.blksz
            or nameoff0 % DIRENT_SIZE
            or nameoff0 > len(block)
        ):
            raise RafsError(f"{what}: bad first name offset {nameoff0}")
        n = nameoff0 // DIRENT_SIZE
        raw = [struct.unpack_from("<QHBx", block, DIRENT_SIZE * i) for i in range(n)]
        result = []
        for i, (child, nameoff, ftype) in enumerate(raw):
            end = raw[i + 1][1] if i + 1 < n else len(block)
            if not nameoff <= end <= len(block):
                raise RafsError(f"{what}: dirent {i} name range [{nameoff}, {end}) is invalid")
            name = block[nameoff:end]
            if i + 1 == n:
                name = name.split(b"\0", 1)[0]
            if not name or len(name) > 255:
                raise RafsError(f"{what}: dirent {i} has an invalid name length {len(name)}")
            result.append(Dirent(name, child, ftype))
        return result

    def children(self, inode: Inode) -> list[Dirent]:
        return [d for d in self.readdir(inode) if d.name not in (b".", b"..")]

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Depth-first (path, inode) pairs; paths are relative ("" for the root)."""
        root = self.root
        yield b"", root
        stack: list[tuple[bytes, Inode, int]] = [(b"", root, 0)]
        seen_dirs = {root.nid}
        while stack:
            path, node, depth = stack.pop()
            if depth > 4096:
                raise RafsError("directory tree too deep (loop?)")
            for d in self.children(node):
                child = self.inode(d.nid)
                cpath = d.name if not path else path + b"/" + d.name
                yield cpath, child
                if child.is_dir:
                    if child.nid in seen_dirs:
                        raise RafsError(f"directory nid {child.nid} reached twice (loop in the tree)")
                    seen_dirs.add(child.nid)
                    stack.append((cpath, child, depth + 1))

    def lookup(self, path: str | bytes) -> Inode:
        bpath = path.encode() if isinstance(path, str) else path
        node = self.root
        for part in [p for p in bpath.split(b"/") if p]:
            match = [d for d in self.readdir(node) if d.name == part]
            if not match:
                raise FileNotFoundError(bpath.decode(errors="replace"))
            node = self.inode(match[0].nid)
        return node
