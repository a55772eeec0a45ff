"""Retries, timeouts and integrity against a real registry behind the fault-injecting proxy."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator

import pytest

from nydus_core.data.remote.errors import BlobNotFound, RegistryError
from nydus_core.data.remote.mirrors import from_nydusd_json
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.testing.proxy import Fault, FaultyProxy
from nydus_core.testing.services import Registry, free_tcp_port

REPO = "faults/app"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blob(registry: Registry) -> bytes:
    data = os.urandom(256 * 1024)
    with RegistryClient(registry.host, REPO, plain_http=True) as c:
        c.push_blob(data)
    return data


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultyProxy]:
    with FaultyProxy(registry.url) as p:
        yield p


def client(proxy: FaultyProxy, **kw: object) -> RegistryClient:
    return RegistryClient(proxy.host, REPO, plain_http=True, backoff=0.01, **kw)  # type: ignore[arg-type]


def test_5xx_and_429_are_retried_then_succeed(proxy: FaultyProxy, blob: bytes) -> None:
    proxy.add_fault(Fault("status", status=500, path_contains="/blobs/", times=1))
    proxy.add_fault(Fault("status", status=429, path_contains="/blobs/", times=1))
    with client(proxy, retries=3) as c:
        assert c.read_range(digest(blob), 10, 10) == blob[10:20]
    assert [r.status for r in proxy.requests] == [500, 429, 206]


def test_retries_are_bounded_and_the_error_is_clear(proxy: FaultyProxy, blob: bytes) -> None:
    with (
        client(proxy, retries=2) as c,
        proxy.fault("status", status=503, path_contains="/blobs/"),
        pytest.raises(RegistryError) as e,
    ):
        c.read_range(digest(blob), 0, 1)
    assert e.value.status == 503 and REPO in str(e.value) and proxy.host in str(e.value)
    assert proxy.count("/blobs/") == 3


def test_dropped_connection_is_retried(proxy: FaultyProxy, blob: bytes) -> None:
    with client(proxy, retries=2) as c:
        proxy.add_fault(Fault("drop", path_contains="/blobs/", times=2))
        assert c.read_range(digest(blob), 100, 50) == blob[100:150]
    assert [r.status for r in proxy.requests] == [0, 0, 206]


def test_timeout_is_retried(proxy: FaultyProxy, blob: bytes) -> None:
    with client(proxy, retries=1, timeout=0.3) as c:
        proxy.add_fault(Fault("delay", seconds=1.0, path_contains="/blobs/", times=1))
        t0 = time.monotonic()
        assert c.read_range(digest(blob), 0, 8) == blob[:8]
        assert time.monotonic() - t0 < 1.0


def test_4xx_is_not_retried(proxy: FaultyProxy) -> None:
    with client(proxy, retries=3) as c, pytest.raises(BlobNotFound):
        c.read_range(digest(b"absent"), 0, 1)
    assert proxy.count("/blobs/") == 1


def test_flipped_byte_fails_the_digest_check_of_a_whole_blob(proxy: FaultyProxy, blob: bytes) -> None:
    with client(proxy) as c:
        with proxy.fault("flip", path_contains="/blobs/"), pytest.raises(RegistryError, match="digest"):
            c.read_blob(digest(blob))
        assert c.read_blob(digest(blob)) == blob  # the fault is gone: the same read succeeds


def test_flip_fault_changes_exactly_one_byte_of_a_range(proxy: FaultyProxy, blob: bytes) -> None:
    with client(proxy) as c, proxy.fault("flip", path_contains="/blobs/", flip_offset=3):
        got = c.read_range(digest(blob), 1000, 16)
    want = blob[1000:1016]
    assert [i for i in range(16) if got[i] != want[i]] == [3]


def test_unreachable_mirror_falls_back_to_origin(proxy: FaultyProxy, blob: bytes) -> None:
    dead = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens there: connection refused
    with client(proxy, mirrors=from_nydusd_json([{"host": dead, "failure_limit": 1}])) as c:
        assert c.read_range(digest(blob), 0, 4) == blob[:4]
        assert c.read_range(digest(blob), 4, 4) == blob[4:8]
        assert not c.mirrors[0].healthy
    assert proxy.count("/blobs/") == 2
