"""A small eStargz writer for the unit tests: blobs built in memory, with knobs real tools lack.

It lays a layer out as eStargz does (a tar header goes in the tail of the current gzip member,
each payload chunk starts a member of its own, the TOC member, the 51-byte footer), and can also
pack several small payloads into one member (``innerOffset``), write the legacy 47-byte footer
or leave ``chunkDigest`` out. Interop with real tools is the e2e tests' job (``ctr-remote``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Item:
    """One tar entry of the layer."""

    name: str
    kind: str = "reg"  # reg, dir, symlink, hardlink, char, block, fifo
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    mtime: int = 1_700_000_000


_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def footer(toc_offset: int, legacy: bool = False) -> bytes:
    text = b"%016xSTARGZ" % toc_offset
    extra = text if legacy else b"SG" + len(text).to_bytes(2, "little") + text
    head = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little") + extra
    return head + b"\x01\x00\x00\xff\xff" + b"\x00" * 8


class _Out:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.z: Any = None
        self.inner = 0
        self.start = 0

    def open(self) -> None:
        self.close()
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.inner = 0
        self.start = len(self.buf)

    def write(self, data: bytes) -> None:
        if self.z is None:
            self.open()
        self.buf += self.z.compress(data)
        self.inner += len(data)

    def close(self) -> None:
        if self.z is not None:
            self.buf += self.z.flush(zlib.Z_FINISH)
            self.z = None


def write_estargz(
    items: Sequence[Item],
    *,
    chunk_size: int = 4 << 20,
    share_small: int = 0,
    landmark_after: int | None = None,
    legacy_footer: bool = False,
    omit_chunk_digests: bool = False,
) -> tuple[bytes, bytes]:
    """(blob, TOC JSON). `share_small`: payloads up to this size share the current member
    (``innerOffset``); `landmark_after`: put ``.prefetch.landmark`` after that many items."""
    out = _Out()
    entries: list[dict[str, Any]] = []
    all_items = list(items)
    if landmark_after is not None:
        all_items.insert(landmark_after, Item(".prefetch.landmark", data=b"\x0f", mode=0))
    out.open()
    for it in all_items:
        info = tarfile.TarInfo(it.name)
        info.type = _TYPES[it.kind]
        info.mode, info.uid, info.gid, info.mtime = it.mode, it.uid, it.gid, it.mtime
        info.linkname = it.link
        info.devmajor, info.devminor = it.dev
        info.size = len(it.data) if it.kind == "reg" else 0
        if it.xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("latin-1") for k, v in it.xattrs.items()}
        out.write(info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"))
        entry: dict[str, Any] = {
            "name": it.name,
            "type": it.kind,
            "mode": it.mode,
            "uid": it.uid,
            "gid": it.gid,
            "modtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(it.mtime)),
        }
        if it.link:
            entry["linkName"] = it.link
        if it.kind in ("char", "block"):
            entry["devMajor"], entry["devMinor"] = it.dev
        if it.xattrs:
            entry["xattrs"] = {k: base64.b64encode(v).decode() for k, v in it.xattrs.items()}
        if it.kind == "reg" and it.data:
            entry["size"] = len(it.data)
            entry["digest"] = "sha256:" + hashlib.sha256(it.data).hexdigest()
            first = True
            for pos in range(0, len(it.data), chunk_size):
                piece = it.data[pos : pos + chunk_size]
                if not (share_small and len(it.data) <= share_small):
                    out.open()
                e: dict[str, Any] = entry if first else {"name": it.name, "type": "chunk"}
                e["offset"] = out.start
                if out.inner:
                    e["innerOffset"] = out.inner
                if pos:
                    e["chunkOffset"] = pos
                if len(it.data) > chunk_size and pos + chunk_size < len(it.data):
                    e["chunkSize"] = len(piece)
                if not omit_chunk_digests:
                    e["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
                if not first:
                    entries.append(e)
                else:
                    entries.append(entry)
                first = False
                out.write(piece)
            pad = -len(it.data) % 512
            if pad:
                out.write(b"\0" * pad)
        else:
            entries.append(entry)
    out.close()
    toc = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    toc_offset = len(out.buf)
    out.open()
    info = tarfile.TarInfo("stargz.index.json")
    info.size, info.mode, info.mtime = len(toc), 0o644, 0
    out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
    out.write(toc + b"\0" * (-len(toc) % 512) + b"\0" * 1024)
    out.close()
    return bytes(out.buf) + footer(toc_offset, legacy_footer), toc


def unpacked(blob: bytes) -> dict[str, tarfile.TarInfo]:
    """The blob read as the plain tar.gz it also is (what containerd's unpack sees)."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        return {m.name: m for m in tf.getmembers()}
