"""The eStargz footer and table of contents, parsed as hostile input.

An eStargz blob ends with a footer (an empty gzip member whose extra field holds the compressed
offset of the TOC member), 51 bytes; the legacy stargz footer of Google's CRFS is 47 bytes. The
TOC member decompresses to a tar entry ``stargz.index.json`` (the TOC JSON) and the tar's end.

Everything here raises `TocError` and nothing else for any input: sizes are bounded before
anything is allocated, JSON types are checked field by field (a JSON ``true`` is not a number),
and names are left to the tree builder, which refuses paths that leave the root.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import attrs

from nydus_core.data.rafs import RafsError
from nydus_stargz.gcpause import paused

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
# Upper bounds for what a layer may ask us to hold in memory (stargz-snapshotter's TOC is a few
# MiB for a large layer; 64 MiB is far beyond any real one).
MAX_TOC_COMPRESSED = 64 << 20
MAX_TOC_JSON = 64 << 20
MAX_ENTRIES = 4_000_000

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")
_KINDS = frozenset(ENTRY_TYPES)
_GZIP_HEAD = b"\x1f\x8b\x08\x04"  # magic, deflate, FLG = FEXTRA
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_U32 = (1 << 32) - 1
_I63 = (1 << 63) - 1
_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)$")


class TocError(RafsError):
    """An eStargz footer or TOC that cannot be used (malformed, truncated, lying sizes, digest)."""


@attrs.frozen
class Footer:
    """Where the TOC member starts, and which footer layout the blob uses."""

    toc_offset: int
    size: int  # of the footer: 51 (eStargz) or 47 (legacy stargz)


def _empty_gzip_member(raw: bytes) -> bool:
    try:
        d = zlib.decompressobj(31)
        out = d.decompress(raw, 1)
        return out == b"" and d.eof and not d.unused_data
    except zlib.error:
        return False


def parse_footer(tail: bytes, blob_size: int | None = None) -> Footer:
    """The footer at the end of `tail` (the last bytes of a blob of `blob_size` bytes).

    Tries the 51-byte eStargz footer, then the 47-byte legacy one; `TocError` when neither is there.
    """
    candidates = (
        (FOOTER_SIZE, 26, lambda f: f[12:14] == b"SG" and struct.unpack_from("<H", f, 14)[0] == 22, 16),
        (LEGACY_FOOTER_SIZE, 22, lambda f: True, 12),
    )
    for size, xlen, subfield_ok, at in candidates:
        if len(tail) < size:
            continue
        f = tail[-size:]
        if f[:4] != _GZIP_HEAD or struct.unpack_from("<H", f, 10)[0] != xlen or not subfield_ok(f):
            continue
        text = f[at : at + 22]
        if text[16:] != b"STARGZ" or not re.fullmatch(rb"[0-9a-fA-F]{16}", text[:16]):
            continue
        if not _empty_gzip_member(f):
            continue
        offset = int(text[:16], 16)
        if blob_size is not None and offset > blob_size - size:
            raise TocError(f"eStargz footer: TOC offset {offset} is beyond the blob ({blob_size} bytes)")
        return Footer(offset, size)
    if len(tail) < LEGACY_FOOTER_SIZE:
        raise TocError(f"eStargz footer: blob too short ({len(tail)} bytes) for a footer")
    raise TocError("no eStargz footer (neither the 51-byte eStargz nor the 47-byte stargz layout)")


@attrs.frozen
class TocFile:
    """The TOC as stored: its JSON bytes and where they sit in the TOC member's output."""

    json_bytes: bytes
    data_offset: int  # of the JSON inside the decompressed TOC member (after its tar header)
    mode: int
    uid: int
    gid: int
    mtime: int

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the JSON: the value of the ``toc.digest`` annotation."""
        return "sha256:" + hashlib.sha256(self.json_bytes).hexdigest()


def read_toc_member(member: bytes) -> TocFile:
    """The ``stargz.index.json`` tar entry of a TOC member (the bytes from the TOC offset to the
    footer)."""
    if len(member) > MAX_TOC_COMPRESSED:
        raise TocError(f"eStargz TOC member is {len(member)} bytes (limit {MAX_TOC_COMPRESSED})")
    limit = MAX_TOC_JSON + (1 << 20)  # room for tar headers
    try:
        d = zlib.decompressobj(31)
        out = d.decompress(member, limit + 1)
    except zlib.error as e:
        raise TocError(f"eStargz TOC member is not valid gzip: {e}") from None
    if len(out) > limit:
        raise TocError(f"eStargz TOC decompresses to more than {limit} bytes")
    if not d.eof:
        raise TocError("eStargz TOC member is truncated (its gzip stream does not end)")
    try:
        with tarfile.open(fileobj=io.BytesIO(out), mode="r:") as tf:
            for info in tf:
                if info.name.lstrip("./") == TOC_NAME and info.isreg():
                    data = out[info.offset_data : info.offset_data + info.size]
                    if len(data) != info.size:
                        raise TocError(f"eStargz TOC: {TOC_NAME} is truncated")
                    return TocFile(
                        data,
                        info.offset_data,
                        info.mode & 0o7777,
                        max(0, info.uid),
                        max(0, info.gid),
                        max(0, int(info.mtime)),
                    )
    except (tarfile.TarError, ValueError, OverflowError, EOFError) as e:
        raise TocError(f"eStargz TOC member is not a readable tar: {e}") from None
    raise TocError(f"eStargz TOC member has no {TOC_NAME} entry")


# -- the JSON ------------------------------------------------------------------------------------


class TocEntry(NamedTuple):
    """One TOC entry, type-checked; absent fields are their zero value, as Go writes them.

    A named tuple, not an attrs class: a layer's TOC has thousands, and a frozen attrs instance
    costs five times as much to make.
    """

    name: str
    type: str
    size: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[bytes, bytes] = MappingProxyType({})
    digest: str = ""
    offset: int = 0
    inner_offset: int = 0
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""


@attrs.frozen
class Toc:
    version: int
    entries: tuple[TocEntry, ...]


def _int(doc: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    value = doc.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TocError(f"{what}: {key} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise TocError(f"{what}: {key} {value} is out of range [{lo}, {hi}]")
    return value


def _str(doc: Mapping[str, Any], key: str, what: str) -> str:
    value = doc.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TocError(f"{what}: {key} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise TocError(f"{what}: {key} contains a NUL byte")
    if not value.isascii():
        try:  # a JSON "\ud800" escape is a lone surrogate, which no name can hold
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise TocError(f"{what}: {key} {value!r} is not text (a lone surrogate)") from None
    return value


def parse_modtime(text: str, what: str) -> tuple[int, int]:
    """RFC 3339 (Go's ``time.Time`` JSON) to (seconds, nanoseconds); before 1970 becomes 0."""
    if not text:
        return 0, 0
    m = _RFC3339.match(text)
    if m is None:
        raise TocError(f"{what}: modtime {text!r} is not an RFC 3339 time")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60):
        raise TocError(f"{what}: modtime {text!r} is not a valid date")
    try:
        secs = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    except (ValueError, OverflowError):
        raise TocError(f"{what}: modtime {text!r} is not a valid date") from None
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        secs -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    nsec = int((frac[1:] + "000000000")[:9]) if frac else 0
    if secs < 0:
        return 0, 0
    return min(secs, (1 << 63) - 1), nsec


def _xattrs(doc: Mapping[str, Any], what: str) -> dict[bytes, bytes]:
    raw = doc.get("xattrs")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TocError(f"{what}: xattrs must be an object")
    out: dict[bytes, bytes] = {}
    for key, value in raw.items():
        if not isinstance(value, str) or not key or "\0" in key:
            raise TocError(f"{what}: xattr {key!r} must be a non-empty name with a base64 string value")
        try:
            name = key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise TocError(f"{what}: xattr name {key!r} is not text (a lone surrogate)") from None
        try:
            out[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise TocError(f"{what}: xattr {key!r} is not valid base64") from None
    return out


def _digest(doc: Mapping[str, Any], key: str, what: str) -> str:
    value = _str(doc, key, what)
    if value and not _DIGEST.fullmatch(value):
        raise TocError(f"{what}: {key} {value!r} is not a sha256 digest")
    return value


def _entry(doc: Any, index: int) -> TocEntry:
    if not isinstance(doc, dict):
        raise TocError(f"TOC entry {index}: must be an object")
    what = f"TOC entry {index}"
    name = _str(doc, "name", what)
    what = f"TOC entry {index} ({name!r})"
    kind = _str(doc, "type", what)
    if kind not in ENTRY_TYPES:
        raise TocError(f"{what}: unknown type {kind!r} (one of {', '.join(ENTRY_TYPES)})")
    mtime, nsec = parse_modtime(_str(doc, "modtime", what), what)
    return TocEntry(
        name=name,
        type=kind,
        size=_int(doc, "size", what),
        mtime=mtime,
        mtime_nsec=nsec,
        link_name=_str(doc, "linkName", what),
        mode=_int(doc, "mode", what, hi=(1 << 32) - 1),
        uid=_int(doc, "uid", what, hi=(1 << 32) - 1),
        gid=_int(doc, "gid", what, hi=(1 << 32) - 1),
        dev_major=_int(doc, "devMajor", what, hi=(1 << 32) - 1),
        dev_minor=_int(doc, "devMinor", what, hi=(1 << 32) - 1),
        xattrs=_xattrs(doc, what),
        digest=_digest(doc, "digest", what),
        offset=_int(doc, "offset", what),
        inner_offset=_int(doc, "innerOffset", what, hi=(1 << 32) - 1),
        chunk_offset=_int(doc, "chunkOffset", what),
        chunk_size=_int(doc, "chunkSize", what),
        chunk_digest=_digest(doc, "chunkDigest", what),
    )


def _entry_fast(doc: dict[str, Any], modtimes: dict[str, tuple[int, int]]) -> TocEntry | None:
    """`_entry` of a well-formed entry in one pass, or ``None`` for anything `_entry` would refuse
    or has to look at more closely (a null, a non-ASCII name, xattrs): it then says what is wrong.
    Accepts only what `_entry` accepts and makes the same `TocEntry`; `modtimes` caches parsed
    times (a layer's files share a few)."""
    get = doc.get
    name = get("name", "")
    kind = get("type", "")
    link = get("linkName", "")
    modtime = get("modtime", "")
    digest = get("digest", "")
    chunk_digest = get("chunkDigest", "")
    size = get("size", 0)
    mode = get("mode", 0)
    uid = get("uid", 0)
    gid = get("gid", 0)
    major = get("devMajor", 0)
    minor = get("devMinor", 0)
    offset = get("offset", 0)
    inner = get("innerOffset", 0)
    chunk_offset = get("chunkOffset", 0)
    chunk_size = get("chunkSize", 0)
    if not (
        type(name) is str
        and type(kind) is str
        and type(link) is str
        and type(modtime) is str
        and type(digest) is str
        and type(chunk_digest) is str
        and type(size) is int
        and type(mode) is int
        and type(uid) is int
        and type(gid) is int
        and type(major) is int
        and type(minor) is int
        and type(offset) is int
        and type(inner) is int
        and type(chunk_offset) is int
        and type(chunk_size) is int
        and kind in _KINDS
        and 0 <= size <= _I63
        and 0 <= mode <= _U32
        and 0 <= uid <= _U32
        and 0 <= gid <= _U32
        and 0 <= major <= _U32
        and 0 <= minor <= _U32
        and 0 <= offset <= _I63
        and 0 <= inner <= _U32
        and 0 <= chunk_offset <= _I63
        and 0 <= chunk_size <= _I63
        and name.isascii()
        and "\0" not in name
        and (not link or (link.isascii() and "\0" not in link))
        and (not digest or _DIGEST.fullmatch(digest))
        and (not chunk_digest or chunk_digest == digest or _DIGEST.fullmatch(chunk_digest))
        and get("xattrs") is None
    ):
        return None
    times = modtimes.get(modtime)
    if times is None:
        try:
            times = parse_modtime(modtime, "")
        except TocError:
            return None
        modtimes[modtime] = times
    return TocEntry(name, kind, size, times[0], times[1], link, mode, uid, gid, major, minor, {}, digest,
                    offset, inner, chunk_offset, chunk_size, chunk_digest)  # fmt: skip


def parse_toc(json_bytes: bytes) -> Toc:
    """The TOC JSON (``{"version": 1, "entries": [...]}``), every field type-checked."""
    with paused():
        return _parse_toc(json_bytes)


def _parse_toc(json_bytes: bytes) -> Toc:
    if len(json_bytes) > MAX_TOC_JSON:
        raise TocError(f"eStargz TOC JSON is {len(json_bytes)} bytes (limit {MAX_TOC_JSON})")
    try:
        doc = json.loads(json_bytes)
    except (ValueError, RecursionError) as e:
        raise TocError(f"eStargz TOC is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise TocError("eStargz TOC: the top level must be an object")
    version = _int(doc, "version", "eStargz TOC", hi=1 << 31)
    if version != 1:
        raise TocError(f"eStargz TOC: unsupported version {version} (1 is known)")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise TocError("eStargz TOC: entries must be a list")
    if len(entries) > MAX_ENTRIES:
        raise TocError(f"eStargz TOC: {len(entries)} entries (limit {MAX_ENTRIES})")
    modtimes: dict[str, tuple[int, int]] = {"": (0, 0)}
    out = []
    for i, item in enumerate(entries):
        entry = _entry_fast(item, modtimes) if type(item) is dict else None
        out.append(_entry(item, i) if entry is None else entry)
    return Toc(version, tuple(out))
