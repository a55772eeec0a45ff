"""Realistic test images: Debian bookworm minbase plus some packages (python3 by default), cached.

Used by plugins/fuse/tests/e2e (the python image) and by the startup benchmark in bench/startup (python,
python-big, gcc).

Building it needs debootstrap and Debian's mirror (deb.debian.org), which CI machines reach. The
root filesystem is built once per machine and kept as one uncompressed tarball under
`CACHE_DIR` (override with ``$NYDUS_TEST_CACHE``), so reruns only pay for umoci, skopeo and the
conversion. The tarball is written to a temp name and renamed, so an interrupted build never
leaves a truncated cache behind.

The OCI image is made with ``umoci raw add-layer`` from that tarball: one gzip layer whose first
entry is ``./`` (not ``/``, which some tar readers mishandle), then pushed with skopeo and
converted with our ``nydusify``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

CACHE_DIR = Path(os.environ.get("NYDUS_TEST_CACHE", "/var/cache/nydus-core-tests"))
ROOTFS_TARBALL = "debian-bookworm-minbase-python3.tar"  # the default package set's cache name
MIRROR = os.environ.get("NYDUS_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
NYDUSIFY = str(Path(sys.executable).with_name("nydusify"))


class ImageBuildError(RuntimeError):
    """A build step failed; the message has the command and its output."""


@attrs.frozen
class DebianImage:
    """The pushed source image, its nydus conversion, and their sizes (for the lazy-pull numbers)."""

    oci_ref: str
    nydus_ref: str
    oci_compressed_bytes: int  # sum of the OCI image's layer blob sizes (gzip)
    build_seconds: dict[str, float]


def _run(*argv: str, timeout: float = 600, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                              f"{proc.stderr[-4000:]}")
    return proc.stdout


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise ImageBuildError(f"{name} not found: run scripts/setup-system.sh (apt-get install {name})")
    return path


def rootfs_tarball(cache_dir: Path = CACHE_DIR, packages: tuple[str, ...] = ("python3",)) -> Path:
    """The cached rootfs tarball with `packages` installed, built with debootstrap when missing.

    The default (python3 alone) keeps its historical cache name; other package sets get a name
    made of the package names, so each set is built once per machine."""
    name = ROOTFS_TARBALL if packages == ("python3",) else f"debian-bookworm-minbase-{'-'.join(packages)}.tar"
    tarball = cache_dir / name
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    debootstrap = _tool("debootstrap")
    with tempfile.TemporaryDirectory(prefix="debian-build-", dir=cache_dir) as tmp:
        root = Path(tmp) / "rootfs"
        _run(debootstrap, "--variant=minbase", SUITE, str(root), MIRROR, timeout=900)
        env_apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
        _run("chroot", str(root), *env_apt, "install", "-y", "-q", "--no-install-recommends", *packages,
             timeout=1800)
        _run("chroot", str(root), *env_apt, "clean")
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        partial = Path(tmp) / "rootfs.tar"
        _run("tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), ".", timeout=600)
        os.replace(partial, tarball)
    return tarball


def _layer_bytes(layout: Path) -> int:
    """Sum of the (compressed) layer sizes named by the layout's one manifest."""
    def blob(digest: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_text())
        return doc

    index = json.loads((layout / "index.json").read_text())
    manifest = blob(index["manifests"][0]["digest"])
    return sum(int(layer["size"]) for layer in manifest["layers"])


def build_debian_py_image(workdir: Path, registry_host: str, repo: str = "debian-py",
                          packages: tuple[str, ...] = ("python3",),
                          extra_layers: Sequence[Path] = ()) -> DebianImage:
    """Push ``<registry_host>/<repo>:bookworm`` (OCI) and ``:nydus`` (converted); return both refs.

    `extra_layers` are uncompressed tarballs stacked on the Debian layer in order (a test's own
    files: they cost a small conversion instead of a second debootstrap package set)."""
    times: dict[str, float] = {}
    t0 = time.monotonic()
    tarball = rootfs_tarball(packages=packages)
    times["rootfs"] = time.monotonic() - t0
    umoci, skopeo = _tool("umoci"), _tool("skopeo")
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "oci"
    image = f"{layout}:{repo}"
    t0 = time.monotonic()
    _run(umoci, "init", "--layout", str(layout))
    _run(umoci, "new", "--image", image)
    for layer in (tarball, *extra_layers):
        _run(umoci, "raw", "add-layer", "--image", image, str(layer), timeout=600)
    _run(umoci, "config", "--image", image, "--config.cmd", "/usr/bin/python3", "--architecture", "amd64",
         "--os", "linux", "--config.env",
         "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    _run(umoci, "gc", "--layout", str(layout))
    oci_ref = f"{registry_host}/{repo}:bookworm"
    _run(skopeo, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image}", f"docker://{oci_ref}")
    times["oci_image"] = time.monotonic() - t0
    compressed = _layer_bytes(layout)
    t0 = time.monotonic()
    nydus_ref = f"{registry_host}/{repo}:nydus"
    _run(NYDUSIFY, "convert", "--plain-http", "--source", oci_ref, "--target", nydus_ref, timeout=900)
    times["nydusify"] = time.monotonic() - t0
    return DebianImage(oci_ref, nydus_ref, compressed, times)
