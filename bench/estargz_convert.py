"""Time the eStargz TOC -> RAFS v6 bootstrap conversion of one layer, phase by phase.

This is what the estargz format does on a layer's Prepare, on the container start's critical
path, once the TOC member is fetched: decompress the member (gzip + its tar), parse the JSON,
check every entry (``nydus_stargz.toc.parse_toc``), build the tree and chunk lists
(``nydus_stargz.bootstrap.build_layer``) and write the bootstrap (``nydus_core.data.rafs.writer``).

The layer is either a real eStargz blob (``--blob``, e.g. a layer ``ctr-remote image convert
--estargz`` made, kept under ``/var/cache/nydus-core-tests/estargz/*/blobs/sha256``) or, by
default, one written by the plugin tests' ``estargz_writer`` over directory trees of this machine
(``/usr/lib/python3`` and ``/usr/lib/python3.11``: about 5,000 entries, the size of the TOC of the
Debian bookworm + python3 image's big layer), or over a layer tar's members (``--tar``, e.g. the
bench's ``/var/cache/nydus-core-tests/debian-bookworm-minbase-python3.tar``: 8,243 entries). The
written layer's TOC member is cached in the temp directory, keyed by its source and the writer, so
later runs start at once.

    .venv/bin/python bench/estargz_convert.py [-n 5] [--clock cpu] [--blob LAYER | --tar TAR]
        [--profile] [--save BOOT | --check BOOT]

Phases (seconds of wall or, with ``--clock cpu``, this process's CPU time; best and median of
``-n`` runs): ``decompress`` (``read_toc_member``), ``json`` (the parser's JSON load),
``entries`` (the rest of ``parse_toc``), ``tree`` (``build_layer`` without the writer),
``write`` (the writer's ``build``). ``--save``/``--check`` store or compare the bootstrap bytes,
to show an optimisation changes no output; ``--profile`` prints a cProfile of one conversion.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import json
import os
import pstats
import stat
import statistics
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nydus_stargz.bootstrap as bootstrap_mod
import nydus_stargz.toc as toc_mod
from nydus_stargz.bootstrap import LayerBootstrap, build_layer
from nydus_stargz.toc import parse_footer, parse_toc, read_toc_member

TESTS = Path(__file__).resolve().parent.parent / "plugins" / "stargz" / "tests"
DEFAULT_TREES = ["/usr/lib/python3", "/usr/lib/python3.11"]
PHASES = ("decompress", "json", "entries", "tree", "write")


# -- the layer -------------------------------------------------------------------------------------
def _items(trees: list[str]) -> Iterator[Any]:
    """The trees as tar entries in a layer's order (``usr/lib/...``, parents first, sorted)."""
    sys.path.insert(0, str(TESTS))
    from estargz_writer import Item

    seen: dict[tuple[int, int], str] = {}
    made: set[str] = set()
    for top in trees:
        for parent in reversed(Path(top).parents):  # the layer's own usr/, usr/lib/
            rel = str(parent).lstrip("/")
            if rel and rel not in made:
                made.add(rel)
                yield Item(rel + "/", "dir", mode=0o755)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel = dirpath.lstrip("/")
            yield Item(rel + "/", "dir", **_meta(dirpath))
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                meta = _meta(path)
                if stat.S_ISLNK(st.st_mode):
                    yield Item(f"{rel}/{name}", "symlink", link=os.readlink(path), **meta)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in seen:
                        yield Item(f"{rel}/{name}", "hardlink", link=seen[key], **meta)
                        continue
                    seen[key] = f"{rel}/{name}"
                    yield Item(f"{rel}/{name}", data=Path(path).read_bytes(), **meta)


def _meta(path: str) -> dict[str, Any]:
    st = os.lstat(path)  # the mode with its type bits, as Go's TOC writer records it
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime": int(st.st_mtime)}


def _tar_items(path: Path) -> Iterator[Any]:
    """A layer tar's members as the writer's items (names, modes, owners, times, xattrs as stored)."""
    sys.path.insert(0, str(TESTS))
    from estargz_writer import Item

    kinds = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
             tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}  # fmt: skip
    with tarfile.open(path) as tf:
        for m in tf:
            xattrs = {k.removeprefix("SCHILY.xattr."): v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}  # fmt: skip
            meta: dict[str, Any] = {"mode": m.mode, "uid": m.uid, "gid": m.gid, "mtime": int(m.mtime),
                                    "xattrs": xattrs}  # fmt: skip
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                yield Item(m.name, data=f.read(), **meta)
            elif m.type in kinds:
                yield Item(m.name, kinds[m.type], link=m.linkname, dev=(m.devmajor, m.devminor), **meta)


def _generated(trees: list[str], tar: Path | None = None) -> tuple[bytes, int, int]:
    """(TOC member, TOC offset, blob size) of a layer written over `trees`, cached."""
    listing = hashlib.sha256((TESTS / "estargz_writer.py").read_bytes() + Path(__file__).read_bytes())
    if tar is not None:
        st = tar.stat()
        listing.update(f"{tar.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
        trees = []
    for top in trees:
        for dirpath, _, filenames in os.walk(top):
            for name in sorted(filenames):
                st = os.lstat(os.path.join(dirpath, name))
                listing.update(f"{dirpath}/{name} {st.st_size} {st.st_mtime_ns}\n".encode())
    cache = Path(tempfile.gettempdir()) / "nydus-estargz-bench" / listing.hexdigest()[:24]
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        return (cache / "member").read_bytes(), meta["toc_offset"], meta["blob_size"]
    sys.path.insert(0, str(TESTS))
    from estargz_writer import write_estargz

    print(f"writing an eStargz layer of {tar or ', '.join(trees)} (once; cached in {cache})", file=sys.stderr)
    blob, _ = write_estargz(list(_tar_items(tar) if tar is not None else _items(trees)))
    member, toc_offset, size = _tail(blob)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "member").write_bytes(member)
    (cache / "meta.json").write_text(json.dumps({"toc_offset": toc_offset, "blob_size": size}))
    return member, toc_offset, size


def _tail(blob: bytes) -> tuple[bytes, int, int]:
    f = parse_footer(blob[-64:], len(blob))
    return blob[f.toc_offset : len(blob) - f.size], f.toc_offset, len(blob)


def _blob(path: Path) -> tuple[bytes, int, int]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 64))
        f = parse_footer(fh.read(), size)
        fh.seek(f.toc_offset)
        return fh.read(size - f.size - f.toc_offset), f.toc_offset, size


# -- timing ----------------------------------------------------------------------------------------
clock = time.perf_counter


def _timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(clock() - start)

    return wrapper


def _instrument() -> tuple[list[float], list[float]]:
    """Wrap the parser's JSON load and the writer's build: (json times, write times)."""
    loads: list[float] = []
    writes: list[float] = []
    if hasattr(toc_mod, "_loads"):
        toc_mod._loads = _timed(toc_mod._loads, loads)
    else:  # a parser calling json.loads directly
        toc_mod.json = types.SimpleNamespace(loads=_timed(json.loads, loads))
    bootstrap_mod.build = _timed(bootstrap_mod.build, writes)
    return loads, writes


def convert(member: bytes, toc_offset: int, blob_size: int) -> LayerBootstrap:
    toc_file = read_toc_member(member)
    toc = parse_toc(toc_file.json_bytes)
    return build_layer(toc, toc_file, blob_id="ab" * 32, blob_size=blob_size, toc_offset=toc_offset)


def run_once(member: bytes, toc_offset: int, blob_size: int, loads: list[float],
             writes: list[float]) -> tuple[dict[str, float], LayerBootstrap, int]:  # fmt: skip
    loads.clear()
    writes.clear()
    t0 = clock()
    toc_file = read_toc_member(member)
    t1 = clock()
    toc = parse_toc(toc_file.json_bytes)
    t2 = clock()
    built = build_layer(toc, toc_file, blob_id="ab" * 32, blob_size=blob_size, toc_offset=toc_offset)
    t3 = clock()
    phases = {
        "decompress": t1 - t0,
        "json": sum(loads),
        "entries": t2 - t1 - sum(loads),
        "tree": t3 - t2 - sum(writes),
        "write": sum(writes),
    }
    return phases, built, len(toc.entries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=int, default=5, help="repetitions (default 5)")
    p.add_argument("--blob", type=Path, help="a real eStargz layer blob (default: one written over --tree)")
    p.add_argument("--tree", action="append", help=f"directory trees to write a layer of ({DEFAULT_TREES})")
    p.add_argument("--tar", type=Path, help="a layer tar to write an eStargz layer of (instead of --tree)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (steadier on a busy machine)")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print a cProfile of one conversion")
    p.add_argument("--save", type=Path, help="write the bootstrap here")
    p.add_argument("--check", type=Path, help="fail unless the bootstrap equals this file's bytes")
    args = p.parse_args(argv)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    if args.blob:
        member, toc_offset, blob_size = _blob(args.blob)
    else:
        member, toc_offset, blob_size = _generated(args.tree or DEFAULT_TREES, args.tar)
    loads, writes = _instrument()
    runs: list[dict[str, float]] = []
    built: LayerBootstrap | None = None
    entries = 0
    gc.collect()
    for _ in range(args.runs):
        phases, built, entries = run_once(member, toc_offset, blob_size, loads, writes)
        runs.append(phases)
    assert built is not None
    src = args.blob or f"layer written of {args.tar or ', '.join(args.tree or DEFAULT_TREES)}"
    boot_digest = hashlib.sha256(built.bootstrap).hexdigest()[:16]
    print(f"{src}: TOC member {len(member)} bytes, {entries} entries, {built.blob.chunk_count} chunks; "
          f"bootstrap {len(built.bootstrap)} bytes sha256:{boot_digest}; {args.runs} runs, {args.clock} "
          f"clock; nydus_stargz from {Path(toc_mod.__file__).parent}")  # fmt: skip
    print(f"{'phase':<11} {'best s':>8} {'median s':>9}")
    for name in (*PHASES, "total"):
        values = [sum(r.values()) if name == "total" else r[name] for r in runs]
        print(f"{name:<11} {min(values):8.4f} {statistics.median(values):9.4f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(convert, member, toc_offset, blob_size)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    if args.save:
        args.save.write_bytes(built.bootstrap)
    if args.check:
        want = args.check.read_bytes()
        if want != built.bootstrap:
            print(f"MISMATCH: the bootstrap differs from {args.check}", file=sys.stderr)
            return 1
        print(f"bootstrap identical to {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
