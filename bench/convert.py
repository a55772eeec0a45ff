"""Convert one OCI layer to RAFS v6 with our writer, and time the same work done by standard tools.

Ours:      layer tar -> tree -> bootstrap + native blob (nydus_core.data.rafs.writer)
Standard:  `tar -x` into a directory, then `mkfs.erofs --chunksize=1048576 --blobdev=BLOB META DIR`

Both produce "EROFS metadata + a chunked data blob"; the standard path is the floor a Python
writer is measured against. Prints wall times, their ratio, and output sizes next to the gzip layer.

    python bench/convert.py --layer debian-py.tar [--gzip debian-py.tar.gz] [--compressor zstd]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nydus_core.data.rafs.tree import tree_from_tar
from nydus_core.data.rafs.writer import BuildOptions, build


def _ours(layer: Path, out: Path, compressor: str) -> tuple[float, int, int]:
    start = time.perf_counter()
    root = tree_from_tar(layer)
    with open(out / "blob", "wb") as f:
        result = build(root, f, BuildOptions(compressor=compressor))
    (out / "image.boot").write_bytes(result.bootstrap)
    elapsed = time.perf_counter() - start
    return elapsed, len(result.bootstrap), (out / "blob").stat().st_size


def _standard(layer: Path, out: Path) -> tuple[float, int, int]:
    rootfs = out / "rootfs"
    rootfs.mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(layer), "-C",
                    str(rootfs)], check=True)  # fmt: skip
    subprocess.run(["mkfs.erofs", "--quiet", "--chunksize=1048576", f"--blobdev={out / 'blob'}",
                    str(out / "meta.erofs"), str(rootfs)], check=True)  # fmt: skip
    elapsed = time.perf_counter() - start
    return elapsed, (out / "meta.erofs").stat().st_size, (out / "blob").stat().st_size


def _mib(n: int) -> str:
    return f"{n / (1 << 20):8.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", required=True, type=Path, help="uncompressed layer tar")
    p.add_argument("--gzip", type=Path, help="the gzip layer for size comparison (made if omitted)")
    p.add_argument("--compressor", default="zstd", choices=["none", "lz4_block", "zstd"])
    args = p.parse_args(argv)
    if shutil.which("mkfs.erofs") is None:
        print("mkfs.erofs not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        gz = args.gzip
        if gz is None:
            gz = work / "layer.tar.gz"
            with open(args.layer, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        (work / "ours").mkdir()
        (work / "std").mkdir()
        t_ours, boot, blob = _ours(args.layer, work / "ours", args.compressor)
        t_std, meta, std_blob = _standard(args.layer, work / "std")
        gz_size = os.path.getsize(gz)
        tar_size = os.path.getsize(args.layer)
        print(f"layer: {args.layer} tar {_mib(tar_size)}, gzip {_mib(gz_size)}")
        print(f"ours ({args.compressor:9s}) {t_ours:7.2f} s  bootstrap {_mib(boot)}  blob {_mib(blob)}"
              f"  blob/gzip {blob / gz_size:5.2f}")  # fmt: skip
        print(f"tar -x + mkfs.erofs   {t_std:7.2f} s  meta      {_mib(meta)}  blob {_mib(std_blob)}"
              f"  blob/gzip {std_blob / gz_size:5.2f}")  # fmt: skip
        print(f"time ratio ours/standard: {t_ours / t_std:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
