"""RegistryClient against a real docker-registry: pushes, manifests, whole and ranged blob reads."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nydus_core.data.remote.errors import BlobNotFound, RegistryError
from nydus_core.data.remote.reference import parse_ref
from nydus_core.data.remote.registry import OCI_MANIFEST, RegistryClient, coalesce
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Registry


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blob(registry: Registry) -> bytes:
    data = os.urandom(3 * 1024 * 1024 + 17)
    with RegistryClient(registry.host, "remote/blobs", plain_http=True) as c:
        d, uploaded = c.push_blob(data)
        assert uploaded and d == digest(data)
    return data


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultyProxy]:
    with FaultyProxy(registry.url) as p:
        yield p


def test_reference_parsing_docker_hub_and_ports() -> None:
    r = parse_ref("busybox")
    assert (r.host, r.api_host, r.repo) == ("docker.io", "index.docker.io", "library/busybox")
    assert r.tag == "latest"
    r = parse_ref("127.0.0.1:5000/a/b@sha256:" + "0" * 64)
    assert (r.host, r.repo, r.tag, r.digest) == ("127.0.0.1:5000", "a/b", "", "sha256:" + "0" * 64)
    assert RegistryClient("docker.io", "library/busybox").host == "index.docker.io"


def test_push_is_skipped_when_blob_exists_and_size_by_head(registry: Registry, blob: bytes) -> None:
    with RegistryClient(registry.host, "remote/blobs", plain_http=True) as c:
        assert c.push_blob(blob) == (digest(blob), False)
        assert c.blob_size(digest(blob)) == len(blob)
        assert c.blob_exists(digest(blob))
        assert not c.blob_exists(digest(b"nope"))


def test_push_from_file_and_cross_repo_mount(registry: Registry, tmp_path: os.PathLike[str]) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "layer.bin"  # type: ignore[operator]
    path.write_bytes(data)
    with RegistryClient(registry.host, "remote/src", plain_http=True) as src:
        assert src.push_blob(path) == (digest(data), True)
    with RegistryClient(registry.host, "remote/dst", plain_http=True) as dst:
        assert dst.push_blob(data, mount_from="remote/src") == (digest(data), False)
        assert dst.read_blob(digest(data)) == data


def test_whole_blob_streams_and_ranges(registry: Registry, blob: bytes) -> None:
    d = digest(blob)
    with RegistryClient(registry.host, "remote/blobs", plain_http=True) as c:
        chunks = list(c.get_blob(d, chunk_size=1 << 20))
        assert len(chunks) >= 3 and b"".join(chunks) == blob
        assert c.read_range(d, 0, 1) == blob[:1]
        assert c.read_range(d, 1_000_000, 4096) == blob[1_000_000:1_004_096]
        assert c.read_range(d, len(blob) - 10, 10) == blob[-10:]
        assert c.read_range(d.removeprefix("sha256:"), 7, 3) == blob[7:10]  # a nydus blob id
        with pytest.raises(ValueError):
            c.read_range("../../etc/passwd", 0, 1)
        with pytest.raises(RegistryError):
            c.read_range(d, len(blob) - 10, 11)  # past the end: never a silently short read


def test_read_ranges_coalesces_nearby_ranges(proxy: FaultyProxy, blob: bytes) -> None:
    d = digest(blob)
    ranges = [(500_000, 100), (0, 10), (20_000, 4096), (2_000_000, 1), (2_010_000, 50)]
    with RegistryClient(proxy.host, "remote/blobs", plain_http=True) as c:
        parts = c.read_ranges(d, ranges, max_gap=64 * 1024)
    assert parts == [blob[o : o + s] for o, s in ranges]
    gets = [r for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path]
    assert sorted(r.range or "" for r in gets) == sorted(
        ["bytes=0-24095", "bytes=500000-500099", "bytes=2000000-2010049"]
    )
    assert coalesce([(10, 5), (0, 5)], 0) == [(0, 5, [1]), (10, 15, [0])]


def test_range_ignored_by_server_is_sliced_from_full_body(
    proxy: FaultyProxy, blob: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    d = digest(blob)
    with RegistryClient(proxy.host, "remote/blobs", plain_http=True) as c, proxy.fault("norange"):
        assert c.read_range(d, 12345, 678) == blob[12345 : 12345 + 678]
        assert c.read_range(d, 99, 1) == blob[99:100]
    assert sum("ignored the Range header" in r.message for r in caplog.records) == 1


def test_manifest_push_and_get(registry: Registry, blob: bytes) -> None:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(blob),
                    "size": len(blob)}],
    }).encode()
    with RegistryClient(registry.host, "remote/blobs", plain_http=True) as c:
        c.push_blob(config)
        assert c.push_manifest("v1", manifest, OCI_MANIFEST) == digest(manifest)
        got = c.get_manifest("v1")
        assert (got.data, got.media_type, got.digest) == (manifest, OCI_MANIFEST, digest(manifest))
        assert c.get_manifest(digest(manifest)).data == manifest
        with pytest.raises(BlobNotFound) as e:
            c.get_manifest("no-such-tag")
        assert e.value.status == 404 and "remote/blobs" in str(e.value)


def test_thread_safe_parallel_range_reads(registry: Registry, blob: bytes) -> None:
    d = digest(blob)
    errors: list[BaseException] = []
    with RegistryClient(registry.host, "remote/blobs", plain_http=True, max_connections=4) as c:

        def work(k: int) -> None:
            try:
                for i in range(10):
                    off = (k * 7919 + i * 104729) % (len(blob) - 4096)
                    assert c.read_range(d, off, 4096) == blob[off : off + 4096]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors


class _Redirector:
    """Two tiny servers: A wants basic auth and redirects blob GETs to B on another host name; B records
    whether an Authorization header reached it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.b_saw_auth: list[bool] = []
        outer = self

        class B(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.b_saw_auth.append("Authorization" in self.headers)
                rng = self.headers.get("Range", "")
                start, _, end = rng.removeprefix("bytes=").partition("-")
                body = outer.data[int(start) : int(end) + 1]
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class A(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                if "Authorization" not in self.headers:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="a"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(307)
                # "localhost" is another host than "127.0.0.1" as far as credentials go.
                self.send_header("Location", f"http://localhost:{outer.b.server_address[1]}/storage/x?sig=1")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.a = ThreadingHTTPServer(("127.0.0.1", 0), A)
        self.b = ThreadingHTTPServer(("127.0.0.1", 0), B)
        for s in (self.a, self.b):
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        for s in (self.a, self.b):
            s.shutdown()
            s.server_close()


def test_redirect_to_another_host_never_carries_authorization() -> None:
    from nydus_core.data.remote.credentials import Credentials

    data = os.urandom(10_000)
    r = _Redirector(data)
    try:
        host = f"127.0.0.1:{r.a.server_address[1]}"
        creds = Credentials("u", "p")
        with RegistryClient(host, "x/y", plain_http=True, credentials_provider=lambda h: creds) as c:
            assert c.read_range(digest(data), 100, 50) == data[100:150]
        assert r.b_saw_auth == [False]
    finally:
        r.stop()
