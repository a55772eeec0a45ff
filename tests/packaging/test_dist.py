"""Packaging as a user meets it: wheels from ``make dist``, a fresh venv, extras.

With only ``nydus-core`` installed the snapshotter lists no backend, runs plain OCI images through
containerd exactly as before, and refuses a nydus image with the extra to install; after
``pip install --find-links dist 'nydus-core[fuse]'`` the fusedev backend is listed with its
distribution and the same image runs lazily. Dependencies (grpcio, pyfuse3, ...) come from the
package index like any user's (pip's cache keeps that quick).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_core.testing.services import (
    Containerd,
    NydusSnapshotter,
    Registry,
    ServiceError,
    unmount_below,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.containerd, pytest.mark.root]

TEMPLATE = {
    "device": {
        "backend": {"type": "registry", "config": {"scheme": "http", "timeout": 10, "retry_limit": 2}},
        "cache": {"type": "blobcache", "config": {"work_dir": ""}},
    },
    "mode": "direct",
    "fs_prefetch": {"enable": False},
}


def run(
    argv: list[str], timeout: float = 600, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: subprocess.CompletedProcess[str] = proc
    return result


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make dist`` into a private directory (the repository's own ``dist/`` is left alone)."""
    out = tmp_path_factory.mktemp("dist") / "dist"
    run(["make", "-s", "-C", str(REPO), "dist", f"DIST={out}"], timeout=900)
    names = sorted(p.name for p in out.iterdir())
    assert [n.split("-")[0] for n in names] == ["nydus_core", "nydus_fuse", "nydus_stargz"], names
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheels: Path) -> Path:
    """A fresh virtual environment with only nydus-core installed from the wheels."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(path)])
    run(
        [str(path / "bin" / "pip"), "install", "--quiet", "--find-links", str(wheels), "nydus-core"],
        timeout=900,
    )
    return path


@pytest.fixture
def stack(venv: Path) -> Iterator[tuple[NydusSnapshotter, Containerd]]:
    tmp_path = Path(tempfile.mkdtemp(prefix="npk-", dir="/tmp"))  # short: the root is limited to 70 bytes
    sock = tmp_path / "nydus" / "nydus.sock"
    template = tmp_path / "nydusd-config.json"
    template.write_text(json.dumps(TEMPLATE))
    flags = ["--nydusd-path", str(venv / "bin" / "nydusd-py"), "--nydusd-config", str(template)]
    snapshotter = NydusSnapshotter(
        tmp_path / "nydus", sock, extra_args=flags, executable=str(venv / "bin" / "containerd-nydus-grpc")
    )
    containerd = Containerd(tmp_path / "containerd", {"nydus": sock})
    snapshotter.start()
    containerd.start()
    try:
        yield snapshotter, containerd
    finally:
        containerd.stop()
        pids = [d["pid"] for d in _daemons(snapshotter)]
        snapshotter.stop()
        for pid in pids:
            if pid:
                subprocess.run(["kill", "-9", str(pid)], check=False)
        unmount_below(tmp_path)
        shutil.rmtree(tmp_path, ignore_errors=True)


def _daemons(snapshotter: NydusSnapshotter) -> list[dict[str, object]]:
    try:
        daemons: list[dict[str, object]] = snapshotter.system_get("/api/v1/daemons")
        return daemons
    except (OSError, ServiceError, ValueError):
        return []


def _listing(venv: Path) -> list[list[str]]:
    out = run([str(venv / "bin" / "containerd-nydus-grpc"), "--list-plugins"])
    return [line.split(None, 4) for line in out.stdout.splitlines()[1:] if not line.startswith("config")]


def test_core_alone_then_the_fuse_extra(
    venv: Path,
    wheels: Path,
    stack: tuple[NydusSnapshotter, Containerd],
    registry: Registry,
    busybox_image: str,
) -> None:
    snapshotter, containerd = stack
    # nydus-core alone: no backend at all, and it says so at start-up
    assert [row for row in _listing(venv) if row[0] == "backend"] == []
    assert "no installed plugin provides this backend" in snapshotter.log_tail()
    assert "pip install 'nydus-core[fuse]'" in snapshotter.log_tail()

    # a plain OCI image runs as with containerd's overlayfs snapshotter
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", busybox_image)
    out = containerd.ctr(
        "run", "--rm", "--snapshotter", "nydus", busybox_image, "plain", "cat", "/etc/hello.txt"
    )
    assert out.stdout == "hello from layer1\n"

    # a nydus image is refused, naming the extra
    nydus_ref = busybox_image.rsplit(":", 1)[0] + ":nydus-dist"
    run(
        [
            sys.executable,
            "-m",
            "nydus_core.cli.nydusify",
            "convert",
            "--source",
            busybox_image,
            "--target",
            nydus_ref,
            "--plain-http",
        ]
    )
    containerd.rpull(nydus_ref)
    refused = containerd.ctr(
        "run", "--rm", "--snapshotter", "nydus", nydus_ref, "lazy", "cat", "/etc/hello.txt", check=False
    )
    assert refused.returncode != 0
    assert "pip install 'nydus-core[fuse]'" in refused.stderr, refused.stderr
    assert "fs_driver 'fusedev'" in refused.stderr and "installed backends: none" in refused.stderr
    containerd.ctr("containers", "delete", "lazy", check=False)

    # with the extra: listed with its distribution, and the same image runs lazily
    run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--find-links", str(wheels), "nydus-core[fuse]"],
        timeout=900,
    )
    backends = [row for row in _listing(venv) if row[0] == "backend"]
    assert [row[:4] for row in backends] == [["backend", "fusedev", "nydus-fuse", "0.1.0"]], backends
    snapshotter.restart()
    attempts: list[subprocess.CompletedProcess[str]] = []

    def lazily_run() -> bool:  # containerd re-dials a restarted proxy plugin with a backoff
        cid = f"lazy-{len(attempts)}"
        attempts.append(
            containerd.ctr(
                "run", "--rm", "--snapshotter", "nydus", nydus_ref, cid, "cat", "/etc/hello.txt", check=False
            )
        )
        return attempts[-1].returncode == 0 or "unavailable" not in attempts[-1].stderr

    wait_until(lazily_run, 30, "containerd to reach the restarted snapshotter")
    assert attempts[-1].returncode == 0 and attempts[-1].stdout == "hello from layer1\n", attempts[-1].stderr
    (daemon,) = _daemons(snapshotter)
    assert daemon["fs_driver"] == "fusedev" and os.path.exists(f"/proc/{daemon['pid']}")

    # the [stargz] extra adds the estargz format and its decoder, nothing else
    run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--find-links", str(wheels), "nydus-core[stargz]"],
        timeout=900,
    )
    rows = [row[:4] for row in _listing(venv) if row[2] == "nydus-stargz"]
    assert rows == [
        ["format", "estargz", "nydus-stargz", "0.1.0"],
        ["decoder", "estargz-gzip", "nydus-stargz", "0.1.0"],
    ]
