"""`nydus-image`: build, check, unpack and inspect RAFS v6 images (upstream subcommand/flag names).

Only the subset that applies to this project is implemented: `create` (tar or directory source,
fs-version 6), `check`, `unpack` and `inspect`. Errors in the input exit with status 1 and one
line that names what is wrong; nothing is written outside the given outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import read_toc, verify_blob_data
from nydus_core.data.rafs.bootstrap import (
    BlobSet,
    Bootstrap,
    bootstrap_from_blob,
    detect_version,
    export_block,
)
from nydus_core.data.rafs.erofs import ErofsImage, Inode
from nydus_core.data.rafs.tree import (
    Node,
    sorted_walk,
    tree_from_dir,
    tree_from_erofs,
    tree_from_tar,
    write_tar,
)
from nydus_core.data.rafs.writer import (
    WHITEOUT_SPECS,
    BuildOptions,
    build_tarfs,
    build_to_paths,
    merge_bootstraps,
)


def _chunk_size(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid chunk size {text!r} (e.g. 0x100000)") from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-image", description="Build and inspect RAFS v6 (nydus) images")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="build a RAFS bootstrap and data blob from a tar or a directory")
    c.add_argument("source", help="layer tar (plain or compressed) or directory")
    types = ["dir-rafs", "tar-rafs", "targz-rafs", "tar-tarfs", "directory"]
    c.add_argument("--type", "-t", choices=types, default=None, help="source type (default: from SOURCE)")
    c.add_argument("--bootstrap", "-B", required=True, help="output bootstrap path")
    c.add_argument("--blob", "-b", help="output blob path")
    c.add_argument("--blob-dir", "-D", help="directory to store the blob in, named by its id")
    c.add_argument("--blob-id", help="tar-tarfs: blob id to record for the tar (default: its sha256)")
    c.add_argument("--compressor", "-c", default="zstd", choices=["none", "lz4_block", "zstd"])
    c.add_argument("--digester", "-d", default="blake3", choices=["blake3", "sha256"])
    c.add_argument(
        "--chunk-size", "-S", type=_chunk_size, default=0x100000, help="chunk size (hex or decimal)"
    )
    c.add_argument("--fs-version", "-v", default="6", choices=["6"], help="RAFS version (only 6 is written)")
    c.add_argument("--whiteout-spec", "-W", default="oci", choices=list(WHITEOUT_SPECS))
    c.add_argument("--output-json", "-J", help="write a JSON summary of the build here")
    c.add_argument("--prefetch-policy", "-P", default="none", choices=["fs", "blob", "none"],
                   help="fs: read paths to prefetch from stdin, one per line")  # fmt: skip
    c.add_argument("--blob-inline-meta", "--inline-bootstrap", action="store_true",
                   help="also store the bootstrap inside the blob (ToC entry image.boot)")  # fmt: skip

    m = sub.add_parser("merge", help="merge layer bootstraps (lowest first) into one image bootstrap")
    m.add_argument("sources", nargs="+", help="layer bootstraps, or blobs with an inlined bootstrap")
    m.add_argument("--bootstrap", "-B", required=True, help="output bootstrap path")
    m.add_argument("--blob-digests", help="comma-separated layer digests to use as blob ids")
    m.add_argument("--blob-sizes", help="comma-separated final blob sizes")
    m.add_argument("--blob-toc-digests", help="comma-separated sha256 digests of the blobs' ToCs")
    m.add_argument("--whiteout-spec", "-W", default="oci", choices=list(WHITEOUT_SPECS))
    m.add_argument("--prefetch-policy", "-P", default="none", choices=["fs", "blob", "none"])
    m.add_argument("--output-json", "-J", help="write a JSON summary here")

    k = sub.add_parser("check", help="validate a bootstrap (and its blobs' chunks when given)")
    k.add_argument("--bootstrap", "-B", required=True)
    k.add_argument("--blob-dir", "-D", help="verify every chunk of the blobs found here")
    k.add_argument("--blob", "-b", help="the single blob of a one-blob bootstrap")
    k.add_argument("--output-json", "-J", help="write the tree and blob list as JSON here")
    k.add_argument("--verbose", "-V", action="store_true", help="print every path")

    u = sub.add_parser("unpack", help="write the image's tree to a tar")
    u.add_argument("--bootstrap", "-B", required=True)
    u.add_argument("--blob", "-b", help="blob file (for a one-blob image)")
    u.add_argument("--blob-dir", "-D", help="directory holding the blobs by id")
    u.add_argument("--output", "-o", required=True, help="output tar path")

    e = sub.add_parser("export", help="--block: one flat disk image (bootstrap + uncompressed blobs)")
    e.add_argument("--block", action="store_true", required=True, help="export a flat block image")
    e.add_argument("--bootstrap", "-B", required=True)
    e.add_argument("--blob", "-b", help="blob file (for a one-blob image)")
    e.add_argument("--blob-dir", "-D", help="directory holding the blobs by id")
    e.add_argument("--output", "-O", required=True, help="output image path")

    i = sub.add_parser("inspect", help="print the superblock, blob table and statistics as JSON")
    i.add_argument("bootstrap", nargs="?")
    i.add_argument("--bootstrap", "-B", dest="bootstrap_opt")
    i.add_argument("--request", "-R", default="stats", choices=["stats", "blobs", "prefetch"])
    return p


def _load_bootstrap(path: str) -> Bootstrap:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RafsError(f"cannot read bootstrap {path}: {exc.strerror}") from exc
    if detect_version(data) == 5:
        raise RafsError(f"{path} is a RAFS v5 bootstrap; only v6 is supported here")
    return Bootstrap(data)


def _blob_set(bs: Bootstrap, blob: str | None, blob_dir: str | None) -> BlobSet | None:
    if blob:
        if len(bs.blobs) != 1:
            raise RafsError(
                f"--blob names one blob but the bootstrap references {len(bs.blobs)}; use --blob-dir"
            )
        return BlobSet(bs, {bs.blobs[0].blob_id: blob})
    if blob_dir:
        return BlobSet.from_dir(bs, blob_dir)
    return None


def _entry_json(path: bytes, node: Node, nlink: dict[int, int]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": "/" + path.decode("utf-8", "surrogateescape"),
        "type": node.kind.name.lower(),
        "mode": f"{stat.S_IMODE(node.mode):04o}",
        "uid": node.uid,
        "gid": node.gid,
        "mtime": node.mtime,
        "mtime_nsec": node.mtime_nsec,
    }
    if node.kind.name == "REG":
        entry["size"] = node.size
    if node.link_target:
        entry["link_target"] = node.link_target.decode("utf-8", "surrogateescape")
    if node.kind.name in ("CHAR", "BLOCK"):
        entry["rdev"] = list(node.rdev)
    if node.xattrs:
        entry["xattrs"] = {k.decode(errors="replace"): v.hex() for k, v in sorted(node.xattrs.items())}
    if not node.is_dir:
        entry["nlink"] = nlink.get(id(node), 1)
    return entry


def cmd_create(args: argparse.Namespace) -> int:
    src = args.source
    kind = args.type or ("dir-rafs" if os.path.isdir(src) else "tar-rafs")
    if not os.path.exists(src):
        raise RafsError(f"source {src} does not exist")
    if kind == "tar-tarfs":
        return _create_tarfs(args)
    if not args.blob and not args.blob_dir:
        raise RafsError("give --blob or --blob-dir for the data blob")
    if args.blob_dir:
        os.makedirs(args.blob_dir, exist_ok=True)  # as upstream: the blob dir is made when missing
    is_dir = kind in ("dir-rafs", "directory")
    root = tree_from_dir(src, markers=args.whiteout_spec) if is_dir else tree_from_tar(src)
    prefetch = _prefetch_paths(args.prefetch_policy)
    opts = BuildOptions(args.chunk_size, args.compressor, args.digester, args.whiteout_spec,
                        prefetch=prefetch, blob_inline_meta=args.blob_inline_meta)  # fmt: skip
    result = build_to_paths(root, args.bootstrap, args.blob, args.blob_dir, opts)
    summary = {
        "version": "6",
        "bootstrap": args.bootstrap,
        "blobs": [b.blob_id for b in result.blobs],
        "blob_size": result.blob.compressed_size if result.blob else 0,
    }
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


def _prefetch_paths(policy: str) -> list[str]:
    """`--prefetch-policy fs` takes absolute paths on stdin, like upstream."""
    if policy != "fs":
        return []
    return [line.strip() for line in sys.stdin if line.strip()]


def _layer_bootstrap(path: str) -> Bootstrap:
    with open(path, "rb") as f:
        head = f.read(2048)
        if len(head) >= 1028 and head[1024:1028] == b"\xe2\xe1\xf5\xe0":
            f.seek(0)
            return Bootstrap(f.read())
        return Bootstrap(bootstrap_from_blob(f, path))


def cmd_merge(args: argparse.Namespace) -> int:
    def split(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",")] if text else None

    sizes = split(args.blob_sizes)
    result = merge_bootstraps(
        [_layer_bootstrap(p) for p in args.sources],
        whiteout_spec=args.whiteout_spec,
        prefetch=_prefetch_paths(args.prefetch_policy),
        blob_digests=split(args.blob_digests),
        blob_sizes=[int(x) for x in sizes] if sizes else None,
        blob_toc_digests=split(args.blob_toc_digests),
    )
    tmp = args.bootstrap + ".tmp"
    with open(tmp, "wb") as out:
        out.write(result.bootstrap)
    os.replace(tmp, args.bootstrap)
    summary = {"version": "6", "bootstrap": args.bootstrap, "blobs": [b.blob_id for b in result.blobs]}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


def _create_tarfs(args: argparse.Namespace) -> int:
    """Only a bootstrap is written: the uncompressed layer tar itself is the blob."""
    opts = BuildOptions(chunk_size=args.chunk_size, whiteout_spec=args.whiteout_spec,
                        prefetch=_prefetch_paths(args.prefetch_policy))  # fmt: skip
    result = build_tarfs(args.source, opts, args.blob_id)
    tmp = args.bootstrap + ".tmp"
    with open(tmp, "wb") as out:
        out.write(result.bootstrap)
    os.replace(tmp, args.bootstrap)
    print(
        json.dumps({"version": "6", "bootstrap": args.bootstrap, "blobs": [b.blob_id for b in result.blobs]})
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    bs = _load_bootstrap(args.bootstrap)
    blobs = _blob_set(bs, args.blob, args.blob_dir)
    count = 0
    try:
        if blobs is not None:
            for entry in bs.blobs:
                if (
                    entry.blob_toc_size
                    and entry.blob_id in blobs.paths
                    and os.path.exists(blobs.paths[entry.blob_id])
                ):
                    with open(blobs.paths[entry.blob_id], "rb") as f:
                        toc = read_toc(f, entry.blob_id, expected_digest=entry.blob_toc_digest)
                        verify_blob_data(f, toc, entry.blob_id)
        for path, ino in bs.walk():
            count += 1
            bs.erofs.xattrs(ino)
            if ino.is_reg and ino.size:
                for i, ref in enumerate(bs.file_chunks(ino)):
                    bs.chunk_info(ref, f"/{path.decode(errors='replace')} chunk {i}")
                if blobs is not None:
                    blobs.read_file(ino)  # decodes and digest-checks every chunk
            if args.verbose:
                print("/" + path.decode(errors="replace"))
        if args.output_json:
            reader = blobs.read_file if blobs is not None else None
            root = tree_from_erofs(bs.erofs, reader, markers=False)
            from nydus_core.data.rafs.tree import link_counts

            nlink = link_counts(root)
            doc = {
                "version": "6",
                "compressor": bs.compressor,
                "digester": bs.digester,
                "chunk_size": bs.ext.chunk_size,
                "blobs": [b.blob_id for b in bs.blobs],
                "tree": [_entry_json(p, n, nlink) for p, n in sorted_walk(root)],
            }
            with open(args.output_json, "w") as f:
                json.dump(doc, f, indent=2)
    finally:
        if blobs is not None:
            blobs.close()
    print(f"RAFS v6 bootstrap {args.bootstrap}: {count} inodes, {len(bs.blobs)} blob(s) OK")
    return 0


def _unpack_v5(args: argparse.Namespace) -> int:
    from nydus_core.data.rafs.v5 import RafsV5, tree_from_v5

    image = RafsV5.open(args.bootstrap)
    blob_path = args.blob or (os.path.join(args.blob_dir, image.blob_ids[0]) if args.blob_dir else None)
    if blob_path is None:
        raise RafsError("give --blob or --blob-dir for the image's data")
    tmp = args.output + ".tmp"
    try:
        with open(blob_path, "rb") as blob, open(tmp, "wb") as out:
            write_tar(tree_from_v5(image, blob), out)
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    with open(args.bootstrap, "rb") as f:
        head = f.read(4096)
    if detect_version(head) == 5:
        return _unpack_v5(args)
    bs = _load_bootstrap(args.bootstrap)
    blobs = _blob_set(bs, args.blob, args.blob_dir)
    has_data = any(i.is_reg and i.size for _, i in bs.walk())
    if blobs is None and has_data:
        raise RafsError("the image has file data: give --blob or --blob-dir")
    tmp = args.output + ".tmp"
    try:
        root = tree_from_erofs(bs.erofs, _reader(blobs), markers=True)
        with open(tmp, "wb") as out:
            write_tar(root, out)
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if blobs is not None:
            blobs.close()
    return 0


def _reader(blobs: BlobSet | None) -> Any:
    if blobs is None:
        return None

    def read(ino: Inode) -> bytes:
        return blobs.read_file(ino)

    return read


def cmd_export(args: argparse.Namespace) -> int:
    bs = _load_bootstrap(args.bootstrap)
    blobs = _blob_set(bs, args.blob, args.blob_dir)
    if blobs is None and bs.blobs:
        raise RafsError("give --blob or --blob-dir")
    tmp = args.output + ".tmp"
    try:
        with open(tmp, "wb") as out:
            size = export_block(bs, blobs or BlobSet(bs, {}), out)
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if blobs is not None:
            blobs.close()
    print(json.dumps({"output": args.output, "size": size}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.bootstrap_opt or args.bootstrap
    if not path:
        raise RafsError("give the bootstrap path")
    bs = _load_bootstrap(path)
    if args.request == "blobs":
        doc: Any = [
            {k: (v.hex() if isinstance(v, bytes) else v) for k, v in vars(b).items()} for b in bs.blobs
        ]
    elif args.request == "prefetch":
        doc = bs.prefetch
    else:
        img: ErofsImage = bs.erofs
        kinds: dict[str, int] = {}
        for _, ino in bs.walk():
            name = stat.filemode(ino.mode)[0]
            kinds[name] = kinds.get(name, 0) + 1
        doc = {
            "version": 6,
            "inodes": img.sb.inos,
            "root_nid": img.sb.root_nid,
            "meta_blkaddr": img.sb.meta_blkaddr,
            "flags": hex(bs.ext.flags),
            "compressor": bs.compressor,
            "digester": bs.digester,
            "chunk_size": hex(bs.ext.chunk_size),
            "chunks": len(bs.chunks),
            "blobs": [b.blob_id for b in bs.blobs],
            "entry_kinds": kinds,
        }
    print(json.dumps(doc, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"create": cmd_create, "merge": cmd_merge, "check": cmd_check, "unpack": cmd_unpack,
                "export": cmd_export, "inspect": cmd_inspect}  # fmt: skip
    try:
        return handlers[args.command](args)
    except RafsError as exc:
        print(f"nydus-image: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nydus-image: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
