"""Small real RAFS images for tests of caches, daemons and backends (plugin authors use it too).

The image is made by the repo's own `nydus-image create` from a tar written with `tarfile` (pax
xattrs, symlinks, a hard link), the blob lands in a localfs blob dir named by its id, and a
nydusd JSON config points a localfs backend at it.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nydus_core.cli.nydus_image import main as nydus_image

FIXTURES = Path("/work/shared/fixtures/nydus")


@dataclass
class Image:
    bootstrap: Path
    blob_dir: Path
    blob_id: str
    files: dict[str, bytes]

    @property
    def blob(self) -> Path:
        return self.blob_dir / self.blob_id


def build_image(
    workdir: Path,
    files: Mapping[str, bytes],
    *,
    symlinks: Mapping[str, str] | None = None,
    xattrs: Mapping[str, Mapping[str, str]] | None = None,
    chunk_size: int = 1 << 20,
    compressor: str = "zstd",
    digester: str = "blake3",
    name: str = "image",
    prefetch: list[str] | None = None,
) -> Image:
    """Tar `files` (path -> bytes), convert it, return where bootstrap and blob are.

    `prefetch` (absolute paths) goes to the bootstrap's prefetch table (``--prefetch-policy fs``,
    which reads the list from stdin as upstream does).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tar_path = workdir / f"{name}.tar"
    dirs: set[str] = set()
    for path in [*files, *(symlinks or {})]:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).get(path, {}).items()}
            tar.addfile(info, io.BytesIO(data))
        for path, target in (symlinks or {}).items():
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 1_700_000_000
            tar.addfile(info)
    boot = workdir / f"{name}.boot"
    blob_dir = workdir / "blobs"
    blob_dir.mkdir(exist_ok=True)
    summary = workdir / f"{name}.json"
    argv = ["create", str(tar_path), "--bootstrap", str(boot), "--blob-dir", str(blob_dir),
            "--chunk-size", hex(chunk_size), "--compressor", compressor, "--digester", digester,
            "--output-json", str(summary)]  # fmt: skip
    if prefetch:
        argv += ["--prefetch-policy", "fs"]
        saved = sys.stdin
        sys.stdin = io.StringIO("".join(p + "\n" for p in prefetch))
        try:
            rc = nydus_image(argv)
        finally:
            sys.stdin = saved
    else:
        rc = nydus_image(argv)
    assert rc == 0
    blob_ids = json.loads(summary.read_text())["blobs"]
    return Image(boot, blob_dir, blob_ids[-1] if blob_ids else "", dict(files))


def localfs_config(blob_dir: Path, work_dir: Path, **extra: object) -> dict[str, object]:
    """A nydusd v1 JSON config with the localfs backend."""
    return {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
            "cache": {"type": "blobcache", "config": {"work_dir": str(work_dir)}},
        },
        "mode": "direct",
        "digest_validate": False,
        **extra,
    }


def flip_byte(path: Path, offset: int) -> bytes:
    """Corrupt one byte in place; returns the original content for restoring."""
    data = path.read_bytes()
    bad = bytearray(data)
    bad[offset] ^= 0xFF
    path.write_bytes(bytes(bad))
    return data
