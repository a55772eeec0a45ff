"""Integrity end to end: a proxy in front of the registry flips one byte of a data blob.

The container's read of the file in that blob fails with EIO (never wrong bytes), the daemon log
names blob and chunk, the chunk's ready bit in the blob cache's chunk map stays clear, and once the
fault is gone the same read in the same container succeeds and the chunk is cached.
"""

from __future__ import annotations

import errno
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_remote_helpers import Stack, md5, source_file, template

from nydus_core.testing.proxy import Fault, FaultyProxy
from nydus_core.testing.services import Registry

pytestmark = pytest.mark.containerd

HEADER = 4096  # nydusd's chunk map header; then one bit per chunk, most significant bit first


@pytest.fixture
def proxy(registry: Registry, plain_nydus: str) -> Iterator[FaultyProxy]:
    with FaultyProxy(registry.url) as p:
        yield p


def _data_blob(registry: Registry, ref: str, index: int) -> str:
    """Hex digest of the nydus image's `index`-th data blob (layer order = source layer order)."""
    repo, _, tag = ref.split("/", 1)[1].rpartition(":")
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{tag}", headers=accept)
    with urllib.request.urlopen(req, timeout=10) as resp:
        manifest = json.load(resp)
    digest: str = manifest["layers"][index]["digest"]
    return digest.split(":", 1)[1]


def _data_extents(path: Path) -> int:
    """Bytes of `path` that are data rather than holes (SEEK_DATA / SEEK_HOLE)."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            total += pos - start
    finally:
        os.close(fd)
    return total


def _ready(chunk_map: Path, index: int) -> bool:
    raw = chunk_map.read_bytes()
    return bool(raw[HEADER + index // 8] & (0x80 >> (index % 8)))


def test_flipped_byte_is_eio_never_cached_then_recovers(
    stack: Stack, registry: Registry, plain_nydus: str, proxy: FaultyProxy, busybox_image: str
) -> None:
    want = md5(source_file(registry.url, busybox_image, "/data/random.bin"))
    blob = _data_blob(registry, plain_nydus, 1)  # layer 2: /data
    ref = f"{proxy.host}/{plain_nydus.split('/', 1)[1]}"
    with stack.scenario("integrity", template("http")) as sc:
        sc.rpull(ref, "--plain-http")
        cid = sc.start(ref)
        fault = proxy.add_fault(Fault("flip", path_contains=blob, method="GET"))
        bad = sc.exec(cid, "busybox", "md5sum", "/data/random.bin")
        assert bad.returncode != 0, bad.stdout
        assert "/data/random.bin': Input/output error" in bad.stderr, bad.stderr
        assert any(r.fault == "flip" for r in proxy.requests)
        logs = sc.logs()
        found = re.search(rf"blob {blob} chunk (\d+): digest mismatch", logs)
        assert found, logs[-4000:]
        index = int(found.group(1))
        chunk_map = sc.cache_dir / f"{blob}.blob.data.chunk_map"
        assert not _ready(chunk_map, index), "a chunk that failed its digest check was marked cached"
        # Every fetch of this blob was corrupted, so nothing of it may be in the cache: no ready
        # bit, and the sparse data file holds no data at all.
        assert not any(chunk_map.read_bytes()[HEADER:])
        assert _data_extents(sc.cache_dir / f"{blob}.blob.data") == 0

        proxy.clear_faults()
        assert fault.kind == "flip"
        good = sc.exec(cid, "busybox", "md5sum", "/data/random.bin")
        assert good.returncode == 0, good.stderr + sc.logs()[-3000:]
        assert good.stdout.split()[0] == want
        assert _ready(chunk_map, index)
        assert _data_extents(sc.cache_dir / f"{blob}.blob.data") >= 1 << 20  # all of random.bin
