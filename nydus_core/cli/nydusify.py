"""`nydusify`: convert an OCI image in a registry to a nydus image, and check a conversion.

Flag names follow upstream nydusify where they apply. Errors (missing image, refused credentials,
unsupported media types, unreachable registries) end with exit status 1 and one line naming the
image and the cause; `check` exits 1 and lists every difference when the images disagree.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from nydus_core.data.rafs import RafsError
from nydus_core.data.remote.errors import RegistryAuthError, RegistryError
from nydus_core.tools.convert import CheckOptions, ConvertError, ConvertOptions, Transport, check, convert
from nydus_core.tools.optimize import OptimizeOptions, optimize

log = logging.getLogger("nydusify")


def _chunk_size(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid chunk size {text!r} (e.g. 0x100000)") from exc


def _transport_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="source image reference (OCI image)")
    p.add_argument("--target", required=True, help="target image reference (nydus image)")
    p.add_argument("--source-insecure", action="store_true",
                   help="skip TLS verification of the source registry (http if it has no TLS)")  # fmt: skip
    p.add_argument("--target-insecure", action="store_true",
                   help="skip TLS verification of the target registry (http if it has no TLS)")  # fmt: skip
    p.add_argument("--plain-http", action="store_true", help="talk plain http to both registries")
    p.add_argument(
        "--platform", default="linux/amd64", help="platform to pick from an index (os/arch[/variant])"
    )
    p.add_argument("--work-dir", help="keep intermediate files here (default: a temp dir, removed)")


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"])
    p.add_argument("--chunk-size", type=_chunk_size, default=0x100000, help="chunk size (hex or decimal)")
    p.add_argument("--fs-version", default="6", choices=["6"], help="RAFS version (only 6)")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} (e.g. '[\"python3\", \"-V\"]')") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"not a JSON array of strings: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusify", description="Convert OCI images to nydus (RAFS v6) images")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert an OCI image and push the nydus image")
    _transport_args(c)
    _build_args(c)
    c.add_argument("--prefetch-patterns", action="store_true",
                   help="read paths to prefetch at mount from stdin, one absolute path per line; their "
                        "data goes first in the blobs")  # fmt: skip
    c.add_argument("--prefetch-dir", action="append", default=[], metavar="PATH",
                   help="an absolute path in the image to prefetch (repeatable)")  # fmt: skip
    o = sub.add_parser("optimize", help="run a workload once and convert with the files it opens "
                                        "prefetched and laid out first")  # fmt: skip
    _transport_args(o)
    _build_args(o)
    o.add_argument("--args", type=_json_list, help='the command, as a JSON array (default: the image\'s Cmd)')
    o.add_argument("--entrypoint", type=_json_list, help="as a JSON array (default: the image's Entrypoint)")
    o.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    o.add_argument("--cwd", help="working directory (default: the image's WorkingDir)")
    o.add_argument("--period", type=float, default=60.0,
                   help="seconds to watch a workload that does not exit (default 60)")  # fmt: skip
    o.add_argument("--net-host", action="store_true", help="run in the host's network namespace")
    o.add_argument("--probe-url", help="stop recording once this URL first answers (a server is ready); "
                                       "needs --net-host")  # fmt: skip
    o.add_argument("--prefetch-out", metavar="FILE", help="also write the recorded list here")
    k = sub.add_parser("check", help="check that a nydus image holds the source image's filesystem")
    _transport_args(k)
    return p


def _transports(args: argparse.Namespace) -> tuple[Transport, Transport]:
    return (Transport(insecure=args.source_insecure, plain_http=args.plain_http),
            Transport(insecure=args.target_insecure, plain_http=args.plain_http))  # fmt: skip


def _prefetch_list(args: argparse.Namespace) -> list[str]:
    """``--prefetch-dir`` paths, then (``--prefetch-patterns``) stdin's lines, as upstream reads them."""
    paths = list(args.prefetch_dir)
    if args.prefetch_patterns:
        paths += [line.strip() for line in sys.stdin if line.strip()]
    for path in paths:
        if not path.startswith("/"):
            raise ConvertError(f"prefetch path {path!r} is not absolute")
    return paths


def cmd_convert(args: argparse.Namespace) -> int:
    source, target = _transports(args)
    opts = ConvertOptions(compressor=args.compressor, chunk_size=args.chunk_size,
                          fs_version=args.fs_version, platform=args.platform, work_dir=args.work_dir,
                          source=source, target=target, prefetch=_prefetch_list(args))  # fmt: skip
    result = convert(args.source, args.target, opts)
    print(f"converted {args.source} -> {args.target} ({result.manifest_digest})")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    if args.probe_url and not args.net_host:
        raise ConvertError("--probe-url needs --net-host (the container has no network of its own)")
    source, target = _transports(args)
    conv = ConvertOptions(compressor=args.compressor, chunk_size=args.chunk_size,
                          fs_version=args.fs_version, platform=args.platform, work_dir=args.work_dir,
                          source=source, target=target)  # fmt: skip
    opts = OptimizeOptions(convert=conv, args=args.args, entrypoint=args.entrypoint, env=args.env,
                           cwd=args.cwd, period=args.period, net_host=args.net_host,
                           probe_url=args.probe_url, prefetch_out=args.prefetch_out)  # fmt: skip
    result = optimize(args.source, args.target, opts)
    print(f"optimized {args.source} -> {args.target} ({result.converted.manifest_digest}): "
          f"{len(result.prefetch)} files prefetched")  # fmt: skip
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    source, target = _transports(args)
    opts = CheckOptions(platform=args.platform, work_dir=args.work_dir, source=source, target=target)
    report = check(args.source, args.target, opts)
    if report.ok:
        print(f"check passed: {args.target} matches {args.source} ({report.entries} entries)")
        return 0
    print(f"check FAILED: {args.target} differs from {args.source}:")
    for line in report.problems:
        print(f"  {line}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    handlers = {"convert": cmd_convert, "optimize": cmd_optimize, "check": cmd_check}
    try:
        return handlers[args.command](args)
    except RegistryAuthError as exc:
        print(f"nydusify: error: authentication failed: {exc}", file=sys.stderr)
    except (ConvertError, RegistryError, RafsError) as exc:
        print(f"nydusify: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"nydusify: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("nydusify: interrupted", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
