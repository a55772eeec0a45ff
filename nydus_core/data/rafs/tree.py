"""One in-memory filesystem tree: what an OCI layer, a directory or a bootstrap becomes.

A `Node` is an inode; a directory maps names to nodes, and hardlinks are simply the same `Node`
object under several names (so link counts are derived, never stored). A layer tree also remembers
the OCI whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) of each directory, so layers
can be merged with overlayfs semantics (`merge_layers`) or written out as markers
(`writer.py`, `--whiteout-spec`).

Tar input is treated as hostile: names are normalised, and anything that would place an entry
outside the root (``..`` components, absolute paths, hardlinks to outside or through a symlink)
raises `RafsError` naming the entry.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import BlobChunk
from nydus_core.data.rafs.bootstrap import BlobEntry, Bootstrap
from nydus_core.data.rafs.erofs import ErofsImage, Inode

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


class Kind(enum.Enum):
    """Inode type, mapped to S_IFMT bits."""

    REG = stat.S_IFREG
    DIR = stat.S_IFDIR
    SYMLINK = stat.S_IFLNK
    CHAR = stat.S_IFCHR
    BLOCK = stat.S_IFBLK
    FIFO = stat.S_IFIFO
    SOCK = stat.S_IFSOCK


class Content(Protocol):
    """Where a regular file's bytes come from; opened only when the writer needs them."""

    def open(self) -> BinaryIO: ...


@dataclass(frozen=True)
class BytesContent:
    data: bytes

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


class _Slice(io.RawIOBase):
    """A bounded read-only window of a file."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


@dataclass(frozen=True)
class FileContent:
    """`size` bytes at `offset` of a file on disk (a plain tar member, or a whole file)."""

    path: str
    offset: int = 0
    size: int = -1

    def open(self) -> BinaryIO:
        f = open(self.path, "rb")  # noqa: SIM115 - handed to the caller, closed by the slice
        if self.offset == 0 and self.size < 0:
            return f
        return io.BufferedReader(_Slice(f, self.offset, self.size))


@dataclass(frozen=True)
class StoredChunk:
    """A chunk that already lives in a blob (a file taken from an existing bootstrap, e.g. by merge)."""

    blob: BlobEntry
    chunk: BlobChunk
    digest: bytes


@dataclass(eq=False)
class Node:
    """An inode. Identity matters: the same Node under two names is a hardlink."""

    kind: Kind
    mode: int = 0o755  # permission and suid/sgid/sticky bits only
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    size: int = 0
    link_target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    content: Content | None = None
    entries: dict[bytes, Node] = field(default_factory=dict)
    # Layer markers (directories only): names this layer deletes, and whether it hides lower layers.
    whiteouts: dict[bytes, Node] = field(default_factory=dict)
    opaque: Node | None = None
    # Regular files from an existing bootstrap: their chunks, so a writer can reference them as-is.
    stored: tuple[StoredChunk, ...] | None = None

    @property
    def st_mode(self) -> int:
        return self.kind.value | (self.mode & 0o7777)

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    def copy_meta(self) -> Node:
        """Same attributes, no children, no markers (a fresh inode)."""
        return Node(self.kind, self.mode, self.uid, self.gid, self.mtime, self.mtime_nsec, dict(self.xattrs),
                    self.size, self.link_target, self.rdev, self.content, stored=self.stored)  # fmt: skip


def new_dir(mode: int = 0o755) -> Node:
    return Node(Kind.DIR, mode)


def walk(root: Node) -> Iterator[tuple[bytes, Node]]:
    """(path, node) pairs, parents before children, names sorted; the root's path is b""."""
    yield b"", root
    stack = [(b"", root)]
    while stack:
        path, node = stack.pop()
        for name in sorted(node.entries, reverse=True):
            child = node.entries[name]
            cpath = path + b"/" + name if path else name
            yield cpath, child
            if child.is_dir:
                stack.append((cpath, child))


def sorted_walk(root: Node) -> list[tuple[bytes, Node]]:
    return sorted(walk(root), key=lambda item: item[0])


def link_counts(root: Node) -> dict[int, int]:
    """id(node) -> st_nlink: names referring to a non-directory, 2 + subdirectories for a directory."""
    counts: dict[int, int] = {}
    for _, node in walk(root):
        if node.is_dir:
            counts[id(node)] = 2 + sum(1 for c in node.entries.values() if c.is_dir)
    for _, node in walk(root):
        for child in node.entries.values():
            if not child.is_dir:
                counts[id(child)] = counts.get(id(child), 0) + 1
    return counts


# -- tar ---------------------------------------------------------------------------------------------
def _clean(name: str, what: str) -> list[bytes]:
    """Split a tar path into safe components; refuses anything that climbs out of the root."""
    raw = name.encode("utf-8", "surrogateescape")
    if raw.startswith(b"/"):
        raise RafsError(f"{what}: absolute path {name!r} is not allowed in a layer")
    parts = []
    for p in raw.split(b"/"):
        if p in (b"", b"."):
            continue
        if p == b"..":
            raise RafsError(f"{what}: path {name!r} escapes the root with '..'")
        if b"\0" in p:
            raise RafsError(f"{what}: NUL byte in path {name!r}")
        if len(p) > 255:
            raise RafsError(f"{what}: path component longer than 255 bytes in {name!r}")
        parts.append(p)
    return parts


def _parent(root: Node, parts: list[bytes], what: str, create: bool = True) -> Node:
    node = root
    for i, p in enumerate(parts):
        child = node.entries.get(p)
        if child is None:
            if not create:
                raise RafsError(
                    f"{what}: {b'/'.join(parts[: i + 1]).decode(errors='replace')} does not exist"
                )
            child = new_dir()
            node.entries[p] = child
        elif not child.is_dir:
            where = b"/".join(parts[: i + 1]).decode(errors="replace")
            raise RafsError(
                f"{what}: {where} is a {child.kind.name.lower()}, not a directory "
                "(an entry cannot be placed through it)"
            )
        node = child
    return node


def _xattrs_from_pax(info: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in info.pax_headers.items():
        for prefix in ("SCHILY.xattr.", "LIBARCHIVE.xattr."):
            if key.startswith(prefix):
                raw = value.encode("utf-8", "surrogateescape")
                if prefix.startswith("LIBARCHIVE"):
                    import base64

                    raw = base64.b64decode(raw + b"=" * (-len(raw) % 4))
                out[key[len(prefix) :].encode("utf-8", "surrogateescape")] = raw
    return out


def _mtime(info: tarfile.TarInfo) -> tuple[int, int]:
    pax = info.pax_headers.get("mtime")
    if pax:
        sec, _, frac = pax.partition(".")
        nsec = int((frac + "000000000")[:9]) if frac else 0
        return int(sec), nsec
    return int(info.mtime), 0


@dataclass(frozen=True)
class SharedFileContent:
    """`size` bytes at `offset` of an already open file (e.g. an anonymous decompressed temp file)."""

    file: BinaryIO
    offset: int
    size: int

    def open(self) -> BinaryIO:
        return io.BufferedReader(_PreadSlice(self.file.fileno(), self.offset, self.size))


class _PreadSlice(io.RawIOBase):
    """Positional reads: many slices can share one descriptor without seeking each other."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._start, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


_MAGICS = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}


def _decompress_to_temp(path: str, kind: str) -> BinaryIO:
    """Whole layer decompressed into an anonymous temp file (bounded memory, random access)."""
    import bz2
    import gzip
    import lzma
    import shutil
    import tempfile

    import zstandard

    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the tree's contents
    try:
        with open(path, "rb") as raw:
            if kind == "zstd":
                with zstandard.ZstdDecompressor().stream_reader(raw) as zsrc:
                    shutil.copyfileobj(zsrc, tmp, 1 << 20)
            else:
                src: io.BufferedIOBase
                if kind == "gzip":
                    src = gzip.GzipFile(fileobj=raw, mode="rb")
                elif kind == "bz2":
                    src = bz2.BZ2File(raw, "rb")
                else:
                    src = lzma.LZMAFile(raw, "rb")  # noqa: SIM115 - closed by the with below
                with src:
                    shutil.copyfileobj(src, tmp, 1 << 20)
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        tmp.close()
        raise RafsError(f"{path}: cannot decompress the {kind} layer: {exc}") from exc
    tmp.seek(0)
    return tmp


def tree_from_tar(path: str | os.PathLike[str]) -> Node:
    """Parse an OCI layer tar (plain, gzip, zstd, bz2 or xz) into a layer tree with its markers.

    File contents are not read: they stay slices of the tar (of a decompressed temp copy for
    compressed layers), read when a writer asks for them.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(6)
    kind = next((k for magic, k in _MAGICS.items() if head.startswith(magic)), None)
    fileobj: BinaryIO = _decompress_to_temp(path, kind) if kind else open(path, "rb")  # noqa: SIM115
    root = new_dir()
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as exc:
        fileobj.close()
        raise RafsError(f"{path}: not a readable tar archive: {exc}") from exc
    with tf:
        try:
            for info in tf:
                _add_tar_member(root, info, fileobj if kind else None, path)
        except tarfile.TarError as exc:
            raise RafsError(f"{path}: corrupt tar: {exc}") from exc
    if kind is None:
        fileobj.close()
    return root


def _add_tar_member(root: Node, info: tarfile.TarInfo, temp: BinaryIO | None, path: str) -> Node | None:
    return add_tar_member(root, info, lambda: FileContent(path, info.offset_data, info.size) if temp is None
                          else SharedFileContent(temp, info.offset_data, info.size))  # fmt: skip


def add_tar_member(root: Node, info: tarfile.TarInfo, content: Callable[[], Content | None]) -> Node | None:
    """Place one tar entry in a layer tree, with tar extraction's semantics and hostile-input checks.

    Other formats that describe a layer as tar entries (an eStargz TOC) build their trees with
    it. `content` gives a non-empty regular file's bytes. Returns the node made or updated (the
    root for ``./``), ``None`` for a whiteout, an opaque marker or a hardlink (an existing node).
    """
    what = f"tar entry {info.name!r}"
    parts = _clean(info.name, what)
    sec, nsec = _mtime(info)
    meta = {"mode": info.mode & 0o7777, "uid": info.uid, "gid": info.gid, "mtime": sec, "mtime_nsec": nsec,
            "xattrs": _xattrs_from_pax(info)}  # fmt: skip
    if not parts:  # "./" - the root itself
        if not info.isdir():
            raise RafsError(f"{what}: the root must be a directory")
        _set_meta(root, meta)
        return root
    parent = _parent(root, parts[:-1], what)
    name = parts[-1]
    if name == OPAQUE_MARKER:
        parent.opaque = Node(Kind.REG, **meta)  # type: ignore[arg-type]
        return None
    if name.startswith(WHITEOUT_PREFIX):
        target = name[len(WHITEOUT_PREFIX) :]
        if not target or target in (b".", b".."):
            raise RafsError(f"{what}: invalid whiteout")
        parent.whiteouts[target] = Node(Kind.REG, **meta)  # type: ignore[arg-type]
        return None
    if info.islnk():
        tparts = _clean(info.linkname, f"{what} hardlink target")
        if not tparts:
            raise RafsError(f"{what}: hardlink to the root directory")
        tparent = _parent(root, tparts[:-1], f"{what} hardlink target", create=False)
        linked = tparent.entries.get(tparts[-1])
        if linked is None:
            raise RafsError(
                f"{what}: hardlink target {info.linkname!r} is not an earlier entry of this layer"
            )
        if linked.is_dir:
            raise RafsError(f"{what}: hardlink to a directory")
        parent.entries[name] = linked
        return None
    if info.isdir():
        existing = parent.entries.get(name)
        if existing is not None and existing.is_dir:
            _set_meta(existing, meta)  # keep children added before the directory's own entry
            return existing
        node = Node(Kind.DIR, **meta)  # type: ignore[arg-type]
    elif info.isreg():
        node = Node(Kind.REG, size=info.size, **meta)  # type: ignore[arg-type]
        if info.size:
            node.content = content()
    elif info.issym():
        target_b = info.linkname.encode("utf-8", "surrogateescape")
        if not target_b or len(target_b) > 4095:
            raise RafsError(f"{what}: symlink target length {len(target_b)} is invalid")
        node = Node(Kind.SYMLINK, size=len(target_b), link_target=target_b, **meta)  # type: ignore[arg-type]
        node.mode = 0o777  # Linux symlinks have no permissions of their own; unpacking gives 0777
    elif info.ischr() or info.isblk():
        kind = Kind.CHAR if info.ischr() else Kind.BLOCK
        node = Node(kind, rdev=(info.devmajor, info.devminor), **meta)  # type: ignore[arg-type]
    elif info.isfifo():
        node = Node(Kind.FIFO, **meta)  # type: ignore[arg-type]
    else:
        raise RafsError(f"{what}: unsupported tar entry type {info.type!r}")
    parent.entries[name] = node
    return node


def _set_meta(node: Node, meta: dict[str, object]) -> None:
    for key, value in meta.items():
        setattr(node, key, value)


# -- directory ---------------------------------------------------------------------------------------
def tree_from_dir(path: str | os.PathLike[str], *, markers: str = "none") -> Node:
    """Read a directory tree (no symlink following); hardlinks are detected by (st_dev, st_ino).

    `markers` says how deletions are spelled in the directory, so a layer directory (e.g. an
    overlayfs upperdir) becomes a layer tree: "none" (plain tree), "oci" (`.wh.NAME`,
    `.wh..wh..opq` files) or "overlayfs" (0/0 character devices, `trusted.overlay.opaque=y`).
    """
    if markers not in ("none", "oci", "overlayfs"):
        raise RafsError(f"unknown marker spelling {markers!r} (none, oci, overlayfs)")
    base = os.fspath(path)
    by_ino: dict[tuple[int, int], Node] = {}

    def load(p: str) -> Node:
        st = os.lstat(p)
        fmt = stat.S_IFMT(st.st_mode)
        key = (st.st_dev, st.st_ino)
        if fmt != stat.S_IFDIR and st.st_nlink > 1 and key in by_ino:
            return by_ino[key]
        try:
            names = os.listxattr(p, follow_symlinks=False)
        except OSError:
            names = []
        xattrs = {n.encode(): os.getxattr(p, n, follow_symlinks=False) for n in names}
        node = Node(Kind(fmt), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns // 10**9,
                    st.st_mtime_ns % 10**9, xattrs)  # fmt: skip
        if fmt == stat.S_IFREG:
            node.size = st.st_size
            node.content = FileContent(p, 0, st.st_size) if st.st_size else None
        elif fmt == stat.S_IFLNK:
            node.link_target = os.fsencode(os.readlink(p))
            node.size = len(node.link_target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif fmt == stat.S_IFDIR:
            for entry in os.listdir(os.fsencode(p)):
                node.entries[entry] = load(os.path.join(p, os.fsdecode(entry)))
            _markers_from_dir(node, markers)
        if st.st_nlink > 1 and fmt != stat.S_IFDIR:
            by_ino[key] = node
        return node

    root = load(base)
    if not root.is_dir:
        raise RafsError(f"{base} is not a directory")
    return root


def _markers_from_dir(node: Node, spelling: str) -> None:
    if spelling == "oci":
        for name in list(node.entries):
            if name == OPAQUE_MARKER:
                node.opaque = node.entries.pop(name)
            elif name.startswith(WHITEOUT_PREFIX) and len(name) > len(WHITEOUT_PREFIX):
                node.whiteouts[name[len(WHITEOUT_PREFIX) :]] = node.entries.pop(name)
    elif spelling == "overlayfs":
        for name, child in list(node.entries.items()):
            if child.kind is Kind.CHAR and child.rdev == (0, 0):
                node.whiteouts[name] = node.entries.pop(name)
        for key in (b"trusted.overlay.opaque", b"user.overlay.opaque"):
            if node.xattrs.get(key) == b"y":
                del node.xattrs[key]
                node.opaque = Node(Kind.REG, 0, node.uid, node.gid, node.mtime, node.mtime_nsec)


# -- overlay merge -------------------------------------------------------------------------------------
def merge_layers(layers: list[Node], *, keep_markers: bool = False) -> Node:
    """Merge layer trees bottom-up as overlayfs shows them; the result has no markers left.

    With `keep_markers` the result is itself a layer that may sit on other layers (eStargz
    layers above plain ones): whiteouts of names it does not hold and opaque markers stay, so
    over any lower dirs it shows what the separate layers would.
    """
    if not layers:
        raise RafsError("no layers to merge")
    merged = _merge_dir(None, layers[0], keep_markers)
    for upper in layers[1:]:
        merged = _merge_dir(merged, upper, keep_markers)
    return merged


def _merge_dir(lower: Node | None, upper: Node, keep: bool = False) -> Node:
    result = upper.copy_meta()
    if lower is not None and upper.opaque is None:
        result.entries = dict(lower.entries)
    for name in upper.whiteouts:
        result.entries.pop(name, None)
    for name, node in upper.entries.items():
        below = result.entries.get(name)
        if node.is_dir:
            merged = _merge_dir(below if below is not None and below.is_dir else None, node, keep)
            if keep and below is not None and not below.is_dir and merged.opaque is None:
                # A file below hid whatever the layers beneath had at this path; the directory
                # replacing it must keep hiding it.
                merged.opaque = Node(Kind.REG)
            result.entries[name] = merged
        else:
            result.entries[name] = node
    if keep:
        result.opaque = upper.opaque or (lower.opaque if lower is not None else None)
        marks = dict(lower.whiteouts) if lower is not None and upper.opaque is None else {}
        marks.update(upper.whiteouts)
        result.whiteouts = {n: m for n, m in marks.items() if n not in result.entries}
    return result


def strip_markers(root: Node) -> Node:
    """A single layer as a final tree (whiteouts and opaque markers have nothing to act on)."""
    return merge_layers([root])


# -- bootstrap -> tree, tree -> tar -------------------------------------------------------------------
@dataclass(frozen=True)
class ReaderContent:
    """A regular file served by a callable that returns its bytes (e.g. a verified blob read)."""

    read: Callable[[], bytes]

    def open(self) -> BinaryIO:
        return io.BytesIO(self.read())


def tree_from_erofs(
    image: ErofsImage,
    read_file: Callable[[Inode], bytes] | None,
    *,
    markers: bool = True,
    chunks_of: Callable[[Inode], tuple[StoredChunk, ...]] | None = None,
) -> Node:
    """A tree from an EROFS/RAFS image; `read_file` serves regular files lazily.

    With `markers`, `.wh.NAME` entries become whiteouts and `.wh..wh..opq` the opaque marker, so
    layer bootstraps written with ``--whiteout-spec oci`` merge like their tars.
    """
    by_nid: dict[int, Node] = {}

    def make(ino: Inode) -> Node:
        node = by_nid.get(ino.nid)
        if node is not None:
            if node.is_dir:
                raise RafsError(f"directory nid {ino.nid} is reached twice (a loop in the tree)")
            return node
        xattrs = image.xattrs(ino)
        node = Node(Kind(stat.S_IFMT(ino.mode)), stat.S_IMODE(ino.mode), ino.uid, ino.gid, ino.mtime,
                    ino.mtime_nsec, xattrs)  # fmt: skip
        if node.kind is Kind.REG:
            node.size = ino.size
            if ino.size and read_file is not None:
                node.content = ReaderContent(functools.partial(read_file, ino))
            if ino.size and chunks_of is not None:
                node.stored = chunks_of(ino)
        elif node.kind is Kind.SYMLINK:
            node.link_target = image.readlink(ino)
            node.size = len(node.link_target)
        elif node.kind in (Kind.CHAR, Kind.BLOCK):
            node.rdev = ino.rdev
        by_nid[ino.nid] = node
        if node.is_dir:
            for d in image.children(ino):
                child = make(image.inode(d.nid))
                if markers and d.name == OPAQUE_MARKER:
                    node.opaque = child
                elif markers and d.name.startswith(WHITEOUT_PREFIX):
                    node.whiteouts[d.name[len(WHITEOUT_PREFIX) :]] = child
                else:
                    node.entries[d.name] = child
        return node

    return make(image.root)


def tree_from_bootstrap(bs: Bootstrap, read_file: Callable[[Inode], bytes] | None = None, *,
                        markers: bool = True) -> Node:  # fmt: skip
    """A RAFS v6 bootstrap as a tree whose files keep their chunk references (for merge)."""

    def chunks_of(ino: Inode) -> tuple[StoredChunk, ...]:
        out = []
        for i, ref in enumerate(bs.file_chunks(ino)):
            info = bs.chunk_info(ref, f"nid {ino.nid} chunk {i}")
            blob = bs.blobs[ref.blob_index]
            compressed = bool(info.flags & 1)
            chunk = BlobChunk(info.index, info.compressed_offset, info.compressed_size,
                              info.uncompressed_offset, info.uncompressed_size, compressed,
                              info.aux)  # fmt: skip
            out.append(StoredChunk(blob, chunk, info.digest))
        return tuple(out)

    return tree_from_erofs(bs.erofs, read_file, markers=markers, chunks_of=chunks_of)


def write_tar(root: Node, out: BinaryIO) -> None:
    """A PAX tar of the tree: hardlinks as links to their first path, xattrs as SCHILY.xattr.*."""
    first_path: dict[int, str] = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path, node, marker in _walk_with_markers(root):
            name = path.decode("utf-8", "surrogateescape") if path else "."
            info = tarfile.TarInfo(name if path else "./")
            info.mode, info.uid, info.gid = node.mode, node.uid, node.gid
            info.mtime = node.mtime
            pax = {"mtime": f"{node.mtime}.{node.mtime_nsec:09d}"} if node.mtime_nsec else {}
            for k, v in node.xattrs.items():
                pax["SCHILY.xattr." + k.decode("utf-8", "surrogateescape")] = v.decode(
                    "utf-8", "surrogateescape"
                )
            info.pax_headers = pax
            if marker:
                info.type, info.size = tarfile.REGTYPE, 0
                tf.addfile(info)
                continue
            if not node.is_dir and id(node) in first_path:
                info.type, info.linkname = tarfile.LNKTYPE, first_path[id(node)]
                tf.addfile(info)
                continue
            first_path[id(node)] = name
            if node.kind is Kind.REG:
                info.type, info.size = tarfile.REGTYPE, node.size
                if node.size:
                    assert node.content is not None
                    with node.content.open() as f:
                        tf.addfile(info, f)
                    continue
            elif node.kind is Kind.DIR:
                info.type = tarfile.DIRTYPE
            elif node.kind is Kind.SYMLINK:
                info.type, info.linkname = (
                    tarfile.SYMTYPE,
                    node.link_target.decode("utf-8", "surrogateescape"),
                )
            elif node.kind in (Kind.CHAR, Kind.BLOCK):
                info.type = tarfile.CHRTYPE if node.kind is Kind.CHAR else tarfile.BLKTYPE
                info.devmajor, info.devminor = node.rdev
            elif node.kind is Kind.FIFO:
                info.type = tarfile.FIFOTYPE
            else:
                raise RafsError(f"{name}: sockets cannot be stored in a tar")
            tf.addfile(info)


def write_dir(root: Node, dest: str | os.PathLike[str]) -> None:
    """Materialise a merged tree (no markers) under the existing directory `dest`, as root would
    unpack it: owners, modes, times, xattrs (best effort: a filesystem without them keeps the
    files), device nodes and hardlinks. Directories get their times last, after their children."""
    base = os.fsencode(dest)
    first_path: dict[int, bytes] = {}
    dirs: list[tuple[bytes, Node]] = []
    for path, node in sorted_walk(root):
        target = base + b"/" + path if path else base
        if path and not node.is_dir and id(node) in first_path:
            os.link(first_path[id(node)], target)
            continue
        first_path[id(node)] = target
        if node.kind is Kind.DIR:
            if path:
                os.mkdir(target, 0o700)
            dirs.append((target, node))
        elif node.kind is Kind.REG:
            with open(target, "wb") as out:
                if node.size:
                    assert node.content is not None
                    with node.content.open() as f:
                        while piece := f.read(1 << 20):
                            out.write(piece)
        elif node.kind is Kind.SYMLINK:
            os.symlink(node.link_target, target)
        elif node.kind in (Kind.CHAR, Kind.BLOCK, Kind.FIFO, Kind.SOCK):
            os.mknod(target, node.st_mode, os.makedev(*node.rdev))
        os.lchown(target, node.uid, node.gid)
        for k, v in node.xattrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(target, k, v, follow_symlinks=False)
        if node.kind is not Kind.SYMLINK:
            os.chmod(target, node.mode & 0o7777)
        if node.kind is not Kind.DIR:
            os.utime(target, ns=(node.mtime * 10**9 + node.mtime_nsec,) * 2, follow_symlinks=False)
    for target, node in reversed(dirs):
        os.utime(target, ns=(node.mtime * 10**9 + node.mtime_nsec,) * 2)


def _walk_with_markers(root: Node) -> Iterator[tuple[bytes, Node, bool]]:
    for path, node in sorted_walk(root):
        yield path, node, False
        if node.is_dir:
            prefix = path + b"/" if path else b""
            if node.opaque is not None:
                yield prefix + OPAQUE_MARKER, node.opaque, True
            for name, marker in sorted(node.whiteouts.items()):
                yield prefix + WHITEOUT_PREFIX + name, marker, True
