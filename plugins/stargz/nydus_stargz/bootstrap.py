"""An eStargz TOC as a RAFS v6 layer bootstrap whose one blob is the eStargz layer itself.

Each payload chunk of the TOC becomes a RAFS chunk of that blob: ``compressed_offset`` is the
gzip member's offset (``offset``), ``compressed_size`` runs to the next member (the next payload or
the TOC), ``aux`` carries ``innerOffset`` (the payload's place in the member's output) and the
digest is ``chunkDigest``. The uncompressed offsets are ours: the daemon's cache file, chunks
packed in TOC order at 4 KiB boundaries.

The tree is built with the tar builder's rules (`nydus_core.data.rafs.tree.add_tar_member`), so
names, hardlinks, whiteouts and opaque markers mean exactly what they mean when containerd unpacks
the same layer; the ``stargz.index.json`` entry itself (a regular file of the unpacked layer) is
included, its data a chunk of the TOC member. Files before ``.prefetch.landmark`` form the
bootstrap's prefetch table.

RAFS chunks of a file are all ``chunk_size`` long but the last, so the TOC's chunking must be
regular: one power-of-two chunk size for the layer (4 MiB, eStargz's default, when no file is
split); anything else is a `TocError` naming the file.
"""

from __future__ import annotations

import bisect
import hashlib
import tarfile

import attrs

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import COMPRESSOR_NAMES, DIGESTER_NAMES, BlobChunk
from nydus_core.data.rafs.bootstrap import BlobEntry
from nydus_core.data.rafs.tree import WHITEOUT_PREFIX, Kind, Node, StoredChunk, add_tar_member, new_dir
from nydus_core.data.rafs.writer import BuildOptions, build
from nydus_stargz.gcpause import paused
from nydus_stargz.toc import PREFETCH_LANDMARK, TOC_NAME, Toc, TocEntry, TocError, TocFile

DEFAULT_CHUNK_SIZE = 4 << 20  # eStargz's default chunk size, and upstream's --chunk-size 0x400000
MAX_CHUNK_SIZE = 16 << 20
ALIGN = 4096
MAX_MAJOR, MAX_MINOR = 0xFFF, 0xFFFFF  # the kernel's dev_t: 12 bits of major, 20 of minor

_TAR_TYPES = {
    "dir": tarfile.DIRTYPE,
    "reg": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@attrs.frozen
class LayerBootstrap:
    """What a layer's conversion produces."""

    bootstrap: bytes
    blob: BlobEntry
    prefetch: tuple[str, ...]  # paths before .prefetch.landmark, in TOC order
    chunk_size: int
    markers: bool  # the layer has whiteouts or opaque dirs (its bootstrap keeps them as OCI files)


@attrs.define
class _Piece:
    """One payload chunk as the TOC describes it."""

    offset: int
    inner: int
    file_offset: int
    size: int  # 0 until resolved: "to the end of the file"
    digest: bytes


@attrs.define
class _File:
    node: Node
    entry: TocEntry
    pieces: list[_Piece] = attrs.Factory(list)


def _sha256(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("sha256:"))  # the parser checked the form


def _tarinfo(e: TocEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.name)
    info.type = _TAR_TYPES[e.type]
    info.mode = e.mode & 0o7777
    info.uid, info.gid = e.uid, e.gid
    info.size = e.size if e.type == "reg" else 0
    info.mtime = e.mtime
    info.linkname = e.link_name
    info.devmajor, info.devminor = e.dev_major, e.dev_minor
    return info


def _place(root: Node, e: TocEntry) -> Node | None:
    node = add_tar_member(root, _tarinfo(e), lambda: None)
    if node is not None and e.type != "hardlink":
        node.mtime, node.mtime_nsec = e.mtime, e.mtime_nsec
        node.xattrs = dict(e.xattrs)
    return node


class _Placer:
    """`_place` for a whole TOC, the plain entries without a tar header each.

    A directory, regular file or symlink with a clean relative name, a new name (or a directory
    over a directory) in a directory already placed, is made here as `add_tar_member` would
    make it; anything else (links, devices, markers, ``.``, ``..`` or ``//`` in a name, a
    missing parent, a name taken) goes through `_place`, which also makes every refusal.
    `dirs` maps the paths of directories met to their nodes; it is dropped whenever `_place`
    runs, since that may replace a node anywhere.
    """

    def __init__(self, root: Node) -> None:
        self.root = root
        self.dirs: dict[bytes, Node] = {b"": root}

    def place(self, e: TocEntry) -> Node | None:
        node = self._plain(e)
        if node is None:
            self.dirs = {b"": self.root}
            node = _place(self.root, e)
        return node

    def _parent(self, path: bytes) -> Node | None:
        node = self.root
        for part in path.split(b"/"):
            if not part or part == b"." or part == b".." or len(part) > 255:
                return None
            child = node.entries.get(part)
            if child is None or child.kind is not Kind.DIR:
                return None
            node = child
        self.dirs[path] = node
        return node

    def _plain(self, e: TocEntry) -> Node | None:
        kind = e.type
        if kind != "reg" and kind != "dir" and kind != "symlink":
            return None
        path = e.name.encode("utf-8", "surrogateescape")
        while path.startswith(b"./"):
            path = path[2:]
        if path.endswith(b"/"):
            path = path[:-1]
        if path.startswith(b"/") or b"\0" in path:
            return None
        cut = path.rfind(b"/")
        name = path[cut + 1 :]
        if not name or name == b"." or name == b".." or len(name) > 255 or name.startswith(WHITEOUT_PREFIX):
            return None
        up = path[:cut] if cut >= 0 else b""
        parent = self.dirs.get(up)
        if parent is None:
            parent = self._parent(up)
            if parent is None:
                return None
        existing = parent.entries.get(name)
        mode, uid, gid, mtime, nsec = e.mode & 0o7777, e.uid, e.gid, e.mtime, e.mtime_nsec
        xattrs = dict(e.xattrs)
        if kind == "dir":
            if existing is not None:
                if existing.kind is not Kind.DIR:
                    return None
                existing.mode, existing.uid, existing.gid = mode, uid, gid
                existing.mtime, existing.mtime_nsec, existing.xattrs = mtime, nsec, xattrs
                return existing
            node = Node(Kind.DIR, mode, uid, gid, mtime, nsec, xattrs)
            self.dirs[path] = node
        elif existing is not None:
            return None
        elif kind == "reg":
            node = Node(Kind.REG, mode, uid, gid, mtime, nsec, xattrs, e.size)
        else:
            target = e.link_name.encode("utf-8", "surrogateescape")
            if not target or len(target) > 4095:
                return None
            node = Node(Kind.SYMLINK, 0o777, uid, gid, mtime, nsec, xattrs, len(target), target)
        parent.entries[name] = node
        return node


def _utf8(name: str) -> bool:
    """Whether a name is UTF-8 text (not bytes kept as surrogate escapes)."""
    if name.isascii():
        return True
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _chunk_digest(e: TocEntry, single: bool) -> bytes:
    """The digest of a file's first piece: its chunkDigest, or the file's when it is one piece."""
    if e.chunk_digest:
        return _sha256(e.chunk_digest)
    if single and e.digest:
        return _sha256(e.digest)
    raise TocError(f"TOC entry {e.name!r}: no chunkDigest, so its data could not be verified")


def _what(i: int, e: TocEntry) -> str:
    return f"TOC entry {i} ({e.name!r})"


def _collect(toc: Toc, root: Node) -> tuple[list[_File], list[str]]:
    """Place every entry; gather each regular file's pieces and the prefetch paths."""
    files: list[_File] = []
    current: _File | None = None
    prefetch: list[str] = []
    landmark_seen = False
    placer = _Placer(root)
    for i, e in enumerate(toc.entries):
        kind = e.type
        if kind == "chunk":
            if current is None or e.chunk_offset == 0:
                raise TocError(f"{_what(i, e)}: a chunk entry must follow the regular file it continues")
            if not e.chunk_digest:
                raise TocError(f"{_what(i, e)}: no chunkDigest, so its data could not be verified")
            current.pieces.append(
                _Piece(e.offset, e.inner_offset, e.chunk_offset, e.chunk_size, _sha256(e.chunk_digest))
            )
            continue
        if kind != "reg":
            current = None
            if (kind == "char" or kind == "block") and (e.dev_major > MAX_MAJOR or e.dev_minor > MAX_MINOR):
                raise TocError(
                    f"{_what(i, e)}: device {e.dev_major}:{e.dev_minor} does not fit a Linux dev_t "
                    f"(major at most {MAX_MAJOR}, minor at most {MAX_MINOR})"
                )
            placer.place(e)
            continue
        path = e.name.strip("/").removeprefix("./")
        if path == PREFETCH_LANDMARK:
            landmark_seen = True
        node = placer.place(e)
        current = None
        if node is None or node.kind is not Kind.REG:  # whiteouts and opaque markers carry no data
            continue
        f = _File(node, e)
        files.append(f)
        current = f
        if e.size:
            if e.chunk_offset != 0:
                raise TocError(
                    f"{_what(i, e)}: the first chunk of a file must start at 0, not {e.chunk_offset}"
                )
            f.pieces.append(_Piece(e.offset, e.inner_offset, 0, e.chunk_size, b""))
        if not landmark_seen and _utf8(e.name):  # the writer's prefetch paths are UTF-8 text
            prefetch.append("/" + path)
    if not landmark_seen:
        prefetch = []  # without the landmark nothing is prioritised
    return files, prefetch


def _resolve(files: list[_File]) -> int:
    """Fill each piece's size and digest; return the layer's chunk size."""
    sizes: set[int] = set()
    for f in files:
        total = f.entry.size
        pieces = f.pieces
        if not total:
            if len(pieces) > 0:
                raise TocError(f"TOC entry {f.entry.name!r}: an empty file has chunk entries")
            continue
        if len(pieces) == 1:  # most files: one piece, the whole file, at file offset 0
            p = pieces[0]
            if p.size and p.size != total:
                raise TocError(
                    f"TOC entry {f.entry.name!r}: the last chunk is {p.size} bytes, the file has {total} left"
                )
            p.size = total
            p.digest = _chunk_digest(f.entry, True)
            continue
        what = f"TOC entry {f.entry.name!r}"
        pos = 0
        for k, p in enumerate(pieces):
            if p.file_offset != pos:
                raise TocError(f"{what}: chunk at file offset {p.file_offset}, expected {pos}")
            last = k == len(pieces) - 1
            size = (total - pos) if (p.size == 0 or last) else p.size
            if last and p.size and p.size != total - pos:
                raise TocError(f"{what}: the last chunk is {p.size} bytes, the file has {total - pos} left")
            if size <= 0 or pos + size > total:
                raise TocError(
                    f"{what}: chunk at {p.file_offset} of {size} bytes overruns the file ({total} bytes)"
                )
            if not last:
                sizes.add(size)
            p.size = size
            if k == 0:
                p.digest = _chunk_digest(f.entry, False)
            pos += size
    if len(sizes) > 1:
        raise TocError(f"the TOC splits files into chunks of {sorted(sizes)} bytes; RAFS needs one size")
    if sizes:
        cs = sizes.pop()
        if cs & (cs - 1) or not ALIGN <= cs <= MAX_CHUNK_SIZE:
            raise TocError(f"the TOC's chunk size {cs} is not a power of two between 4 KiB and 16 MiB")
    else:  # no file is split: the default, or the smallest power of two that holds the largest
        cs = DEFAULT_CHUNK_SIZE
        biggest = max((p.size for f in files for p in f.pieces), default=0)
        while cs < biggest and cs < MAX_CHUNK_SIZE:
            cs <<= 1
    for f in files:
        if len(f.pieces) == 1 and f.pieces[0].size > cs:
            raise TocError(
                f"TOC entry {f.entry.name!r}: one chunk of {f.pieces[0].size} bytes, more than "
                f"the layer's chunk size {cs}"
            )
    return cs


def _toc_node(root: Node, toc_file: TocFile, toc_offset: int, cs: int) -> _File | None:
    """The ``stargz.index.json`` file of the unpacked layer, its data read from the TOC member."""
    e = TocEntry(
        name=TOC_NAME,
        type="reg",
        size=len(toc_file.json_bytes),
        mtime=toc_file.mtime,
        mode=toc_file.mode,
        uid=toc_file.uid,
        gid=toc_file.gid,
    )
    node = _place(root, e)
    if node is None or not e.size:
        return None
    f = _File(node, e)
    data = toc_file.json_bytes
    for pos in range(0, len(data), cs):
        piece = data[pos : pos + cs]
        f.pieces.append(
            _Piece(toc_offset, toc_file.data_offset + pos, pos, len(piece), hashlib.sha256(piece).digest())
        )
    return f


def build_layer(
    toc: Toc, toc_file: TocFile, *, blob_id: str, blob_size: int, toc_offset: int
) -> LayerBootstrap:
    """The RAFS v6 bootstrap of one eStargz layer (blob id: the layer digest's hex)."""
    with paused():
        return _build_layer(toc, toc_file, blob_id, blob_size, toc_offset)


def _build_layer(
    toc: Toc, toc_file: TocFile, blob_id: str, blob_size: int, toc_offset: int
) -> LayerBootstrap:
    root = new_dir()
    try:
        files, prefetch = _collect(toc, root)
        cs = _resolve(files)
        toc_f = _toc_node(root, toc_file, toc_offset, cs)
    except TocError:
        raise
    except RafsError as e:
        raise TocError(f"eStargz TOC: {e}") from None
    if toc_f is not None:
        files.append(toc_f)
    starts = sorted({p.offset for f in files for p in f.pieces} | {toc_offset})
    entry = BlobEntry(
        blob_id=blob_id,
        chunk_size=cs,
        compression_algo=COMPRESSOR_NAMES["gzip"],
        digest_algo=DIGESTER_NAMES["sha256"],
        compressed_size=blob_size,
    )
    index = 0
    uoff = 0
    nstarts = len(starts)
    after = bisect.bisect_right
    for f in files:
        stored: list[StoredChunk] = []
        is_toc = f is toc_f
        for p in f.pieces:
            offset, size = p.offset, p.size
            if offset > toc_offset or (offset == toc_offset and not is_toc):
                raise TocError(
                    f"TOC entry {f.entry.name!r}: payload offset {offset} is not before the TOC "
                    f"({toc_offset})"
                )
            if is_toc:  # the TOC member runs to the footer
                end = blob_size
            else:  # a payload's gzip member runs to the next one
                nxt = after(starts, offset)
                end = starts[nxt] if nxt < nstarts else blob_size
            if end - offset > 0xFFFF_FFFF or size > 0xFFFF_FFFF:
                raise TocError(f"TOC entry {f.entry.name!r}: a gzip member over 4 GiB")
            chunk = BlobChunk(index, offset, end - offset, uoff, size, True, p.inner)
            stored.append(StoredChunk(entry, chunk, p.digest))
            index += 1
            uoff += -(-size // ALIGN) * ALIGN
        f.node.stored = tuple(stored)
    entry.chunk_count = index
    entry.uncompressed_size = uoff
    opts = BuildOptions(
        chunk_size=cs,
        compressor="gzip",
        digester="sha256",
        whiteout_spec="oci",
        prefetch=list(prefetch),
        prefetch_skip_missing=True,
    )
    try:
        result = build(root, None, opts)
    except RafsError as e:
        raise TocError(f"eStargz TOC: {e}") from None
    return LayerBootstrap(result.bootstrap, entry, tuple(prefetch), cs, _has_markers(root))


def _has_markers(root: Node) -> bool:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.whiteouts or node.opaque is not None:
            return True
        stack.extend(c for c in node.entries.values() if c.is_dir)
    return False
