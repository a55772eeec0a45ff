"""`nydusd-py` with the ``registry`` backend: lazy ranged reads from a real docker-registry behind
the fault-injecting proxy (which counts what the registry served and can flip a byte)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import running

from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.data.rafs.bootstrap import Bootstrap
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.testing.images import Image, build_image
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")

REPO = "lazy/app"
BIG = os.urandom(4 << 20)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nydr-", dir="/tmp"))
    yield path
    umount_tree(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pushed(root: Path, registry: Registry) -> Image:
    img = build_image(root / "img", {"big.bin": BIG, "small.txt": b"small\n"})
    with RegistryClient(registry.host, REPO, plain_http=True) as c:
        digest, _ = c.push_blob(img.blob.read_bytes())
    assert digest == f"sha256:{img.blob_id}"  # a RAFS blob id is its sha256
    return img


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultyProxy]:
    with FaultyProxy(registry.url) as p:
        yield p


def _config(root: Path, proxy: FaultyProxy) -> Path:
    path = root / "config.json"
    path.write_text(json.dumps({
        "device": {"backend": {"type": "registry",
                               "config": {"host": proxy.host, "repo": REPO, "scheme": "http", "timeout": 5,
                                          "retry_limit": 0}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(root / "cache")}}},
        "amplify_io": 1 << 20,
    }))  # fmt: skip
    return path


def _served(proxy: FaultyProxy) -> int:
    total = 0
    for r in proxy.requests:
        if "/blobs/" in r.path and r.range:
            lo, hi = r.range.removeprefix("bytes=").split("-")
            total += int(hi) - int(lo) + 1
    return total


def test_lazy_reads_fetch_only_needed_ranges(root: Path, pushed: Image, proxy: FaultyProxy) -> None:
    cfg = _config(root, proxy)
    with running(root, "--config", str(cfg), "--bootstrap", str(pushed.bootstrap)) as (_, mnt, sock):
        assert (mnt / "small.txt").read_bytes() == b"small\n"
        with open(mnt / "big.bin", "rb") as f:
            f.seek(3 << 20)
            assert f.read(1000) == BIG[3 << 20 : (3 << 20) + 1000]
        served = _served(proxy)
        assert 0 < served < pushed.blob.stat().st_size // 2  # ranges, far less than the blob
        assert all(r.range for r in proxy.requests if "/blobs/" in r.path and r.method == "GET")
        with NydusdClient(sock) as c:
            backend = c._json("GET", "/api/v1/metrics/backend")
            assert backend["backend_type"] == "registry" and backend["read_amount_total"] == served
        # everything, then again: the second pass is served from the cache alone
        assert (mnt / "big.bin").read_bytes() == BIG
        before = len(proxy.requests)
        with open("/proc/sys/vm/drop_caches", "w") as dc:
            dc.write("3\n")
        assert (mnt / "big.bin").read_bytes() == BIG
        assert len(proxy.requests) == before


def test_flipped_byte_from_registry_is_eio_and_never_cached(
    root: Path, pushed: Image, proxy: FaultyProxy
) -> None:
    bs = Bootstrap.open(pushed.bootstrap)
    node = bs.erofs.lookup("big.bin")
    chunk = bs.chunk_info(bs.file_chunks(node)[2], "big.bin")
    cfg = _config(root, proxy)
    with running(root, "--config", str(cfg), "--bootstrap", str(pushed.bootstrap)) as (_, mnt, _s):
        # every blob response has a byte flipped while the fault is armed
        with proxy.fault("flip", path_contains="/blobs/"), open(mnt / "big.bin", "rb") as f:
            f.seek(2 << 20)
            with pytest.raises(OSError) as exc:
                f.read(4096)
        assert exc.value.errno == errno.EIO
        assert proxy.count("/blobs/") >= 1
        log = (root / "nydusd.log").read_text()
        assert f"blob {pushed.blob_id} chunk {chunk.index}" in log
        # the fault is gone: the same read succeeds and the data is right
        with open(mnt / "big.bin", "rb") as f:
            f.seek(2 << 20)
            assert f.read(4096) == BIG[2 << 20 : (2 << 20) + 4096]


def test_registry_errors_are_eio_not_a_crash(root: Path, pushed: Image, proxy: FaultyProxy) -> None:
    cfg = _config(root, proxy)
    with running(root, "--config", str(cfg), "--bootstrap", str(pushed.bootstrap)) as (_, mnt, sock):
        with proxy.fault("status", status=503, path_contains="/blobs/"), pytest.raises(OSError) as exc:
            (mnt / "small.txt").read_bytes()
        assert exc.value.errno == errno.EIO
        with NydusdClient(sock) as c:
            assert c.state() == "RUNNING"
            assert c._json("GET", "/api/v1/metrics/backend")["read_errors"] >= 1
        assert (mnt / "small.txt").read_bytes() == b"small\n"


def test_slow_fetch_does_not_stall_other_requests(root: Path, pushed: Image, proxy: FaultyProxy) -> None:
    cfg = _config(root, proxy)
    with running(root, "--config", str(cfg), "--bootstrap", str(pushed.bootstrap)) as (_, mnt, _s):
        assert (mnt / "small.txt").read_bytes() == b"small\n"  # cached now
        done: list[float] = []

        def slow_reader() -> None:
            with open(mnt / "big.bin", "rb") as f:
                f.seek(3 << 20)
                f.read(4096)
            done.append(time.monotonic())

        with proxy.fault("delay", seconds=2.0, path_contains="/blobs/"):
            t = threading.Thread(target=slow_reader)
            t.start()
            time.sleep(0.3)  # the slow fetch is in flight
            start = time.monotonic()
            for _ in range(20):
                assert (mnt / "small.txt").read_bytes() == b"small\n"
                os.stat(mnt / "big.bin")
                os.listdir(mnt)
            fast = time.monotonic() - start
            assert not done  # the slow read is still waiting for the registry
        t.join(10)
        assert fast < 1.0 and done


def test_prefetch_files_warm_the_cache(root: Path, pushed: Image, proxy: FaultyProxy) -> None:
    cfg = _config(root, proxy)
    files = root / "prefetch.list"
    files.write_text("/big.bin\n")
    args = ("--config", str(cfg), "--bootstrap", str(pushed.bootstrap), "--prefetch-files", str(files))
    with running(root, *args) as (_, mnt, sock), NydusdClient(sock) as c:
        deadline = time.monotonic() + 20
        while c.blobcache_metrics()["prefetch_data_amount"] < len(BIG) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.blobcache_metrics()["prefetch_data_amount"] >= len(BIG)
        # the registry is gone now, yet the whole file reads from the cache
        with proxy.fault("status", status=503, path_contains="/blobs/"):
            assert (mnt / "big.bin").read_bytes() == BIG
