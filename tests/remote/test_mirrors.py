"""Mirrors: config parsing (nydusd JSON array, containerd hosts.toml) and a real pull-through mirror.

The mirror is a second docker-registry in proxy mode (``proxy: remoteurl:``) in front of a
token-auth origin. Counting proxies (`FaultyProxy`) sit in front of the mirror and of the origin
so the tests see where each read went.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from remote_helpers import PASSWORD, USER, Pki, hook_credentials, start_registry
from token_server import TokenServer

from nydus_core.data.remote.mirrors import (
    MirrorConfig,
    MirrorConfigError,
    from_hosts_dir,
    from_nydusd_json,
    hosts_dir_for,
)
from nydus_core.data.remote.registry import USER_AGENT, RegistryClient
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Registry

REPO = "mirror/app"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def served_blob_reads(proxy: FaultyProxy) -> int:
    """Blob GETs that were answered with data (a 401 that starts the token flow is not a read)."""
    return sum(
        1 for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path and r.status in (200, 206)
    )


# ------------------------------------------------------------------ parsing


def test_nydusd_json_mirrors() -> None:
    got = from_nydusd_json([
        {"host": "http://127.0.0.1:65001", "headers": {"X-Dragonfly-Registry": "https://origin"},
         "auth_through": False, "health_check_interval": 7, "failure_limit": 2, "ping_url": "http://p/ping"},
        {"host": ""},  # skipped, as nydusd does
        {"host": "mirror.example.com"},
    ])
    assert got[0] == MirrorConfig(url="http://127.0.0.1:65001", headers={"X-Dragonfly-Registry": "https://origin"},
                                  auth_through=False, health_check_interval=7.0, failure_limit=2,
                                  ping_url="http://p/ping")
    assert got[0].api_root == "http://127.0.0.1:65001/v2"
    assert got[1].url == "https://mirror.example.com" and len(got) == 2
    with pytest.raises(MirrorConfigError, match="failure_limit"):
        from_nydusd_json([{"host": "h", "failure_limit": "many"}])


def test_hosts_toml_lookup_order_and_keys(tmp_path: Path) -> None:
    def write(name: str, text: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "hosts.toml").write_text(text)

    write("_default", '[host."http://default-mirror:1"]\n')
    write("reg.example.com", '[host."http://plain-host-mirror:2"]\n')
    write("reg.example.com_5000_", '''
server = "https://reg.example.com:5000"
[host."https://m1.example.com:8443/base"]
  capabilities = ["pull"]
  ca = "certs/m1.pem"
  skip_verify = false
  override_path = true
  header = { X-Token = ["a", "b"] }
  failure_limit = 3
  health_check_interval = 1.5
  ping_url = "https://m1.example.com:8443/ping"
[host."http://m0.example.com"]
  skip_verify = true
''')
    assert hosts_dir_for(tmp_path, "reg.example.com:5000") == tmp_path / "reg.example.com_5000_"
    assert [m.url for m in from_hosts_dir(tmp_path, "reg.example.com")] == ["http://plain-host-mirror:2"]
    assert [m.url for m in from_hosts_dir(tmp_path, "other:1")] == ["http://default-mirror:1"]
    m1, m0 = from_hosts_dir(tmp_path, "reg.example.com:5000")  # file order
    assert m1.api_root == "https://m1.example.com:8443/base"  # override_path: no /v2 added
    assert m1.ca_files == (str(tmp_path / "reg.example.com_5000_" / "certs/m1.pem"),)
    assert (m1.capabilities, m1.failure_limit, m1.health_check_interval) == (("pull",), 3, 1.5)
    assert m1.headers == {"X-Token": "a, b"} and m1.ping_url.endswith("/ping")
    assert m0.skip_verify and m0.api_root == "http://m0.example.com/v2"
    (tmp_path / "_default" / "hosts.toml").write_text("[host\n")
    with pytest.raises(MirrorConfigError, match=r"hosts\.toml"):
        from_hosts_dir(tmp_path, "x")


# ------------------------------------------------------------------ a real pull-through mirror


@pytest.fixture
def origin(token_registry: Registry) -> Iterator[FaultyProxy]:
    """A counting proxy in front of the token-auth origin; the client talks to the origin through it."""
    with FaultyProxy(token_registry.url) as p:
        yield p


@pytest.fixture
def blob(token_registry: Registry, docker_config: Callable[..., Path]) -> bytes:
    docker_config(token_registry.host)
    data = os.urandom(1024 * 1024)
    creds = hook_credentials()
    with RegistryClient(token_registry.host, REPO, plain_http=True, credentials_provider=creds) as c:
        c.push_blob(data)
    return data


def start_mirror(tmp_path: Path, origin_registry: Registry) -> Registry:
    return start_registry(tmp_path / "mirror", {
        "proxy": {"remoteurl": origin_registry.url, "username": USER, "password": PASSWORD},
    })


def test_json_mirror_auth_through_false_then_mirror_dies(
    tmp_path: Path, token_registry: Registry, token_server: TokenServer, origin: FaultyProxy, blob: bytes,
    docker_config: Callable[..., Path],
) -> None:
    docker_config(origin.host)  # the client knows the origin by the counting proxy's address
    mirror_reg = start_mirror(tmp_path, token_registry)
    try:
        with FaultyProxy(mirror_reg.url) as mirror:
            mirrors = from_nydusd_json([{"host": mirror.url, "auth_through": False, "failure_limit": 2,
                                         "health_check_interval": 60, "headers": {"X-Mirror-Test": "1"}}])
            ours_before = token_server.count(USER_AGENT)
            d = digest(blob)
            with RegistryClient(origin.host, REPO, plain_http=True, mirrors=mirrors,
                                credentials_provider=hook_credentials()) as c:
                for off in range(0, 400_000, 50_000):
                    assert c.read_range(d, off, 4096) == blob[off : off + 4096]
                assert c.blob_size(d) == len(blob)
                mirror_gets = [r for r in mirror.requests if "/blobs/" in r.path]
                assert len(mirror_gets) == 9
                # auth_through = false: the mirror got the origin's token, fetched from the origin's realm.
                assert all(r.authorized and r.header("x-mirror-test") == "1" for r in mirror_gets)
                assert token_server.count(USER_AGENT) == ours_before + 1
                assert origin.count("/blobs/") == 0  # the origin only answered the /v2/ auth probe
                assert origin.count("/v2/") == 1

                mirror_reg.stop()  # mid-run: reads must not fail
                for off in range(400_000, 800_000, 50_000):
                    assert c.read_range(d, off, 4096) == blob[off : off + 4096]
                assert not c.mirrors[0].healthy
                # Two failures (failure_limit) reached the mirror, then it was skipped.
                assert sum(1 for r in mirror.requests if "/blobs/" in r.path and r.status == 502) == 2
                assert served_blob_reads(origin) == 8
    finally:
        mirror_reg.stop()


def test_hosts_toml_mirror_and_fallback(
    tmp_path: Path, token_registry: Registry, origin: FaultyProxy, blob: bytes,
    docker_config: Callable[..., Path],
) -> None:
    docker_config(origin.host)
    mirror_reg = start_mirror(tmp_path, token_registry)
    try:
        with FaultyProxy(mirror_reg.url) as mirror:
            port = origin.port
            conf = tmp_path / "certs.d" / f"127.0.0.1_{port}_"
            conf.mkdir(parents=True)
            (conf / "hosts.toml").write_text(
                f'server = "{origin.url}"\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
                '  failure_limit = 1\n  health_check_interval = 0.3\n'
            )
            mirrors = from_hosts_dir(tmp_path / "certs.d", origin.host)
            d = digest(blob)
            with RegistryClient(origin.host, REPO, plain_http=True, mirrors=mirrors,
                                credentials_provider=hook_credentials()) as c:
                parts = c.read_ranges(d, [(0, 100), (300_000, 100), (900_000, 100)], max_gap=0)
                assert parts == [blob[0:100], blob[300_000:300_100], blob[900_000:900_100]]
                assert mirror.count("/blobs/") == 3 and origin.count("/blobs/") == 0
                # A hosts.toml mirror is its own host: no origin credentials were sent to it.
                assert not any(r.authorized for r in mirror.requests)

                # The mirror answers 503 for a while: one failure disables it, reads go to the origin.
                with mirror.fault("status", status=503, path_contains="/blobs/"):
                    assert c.read_range(d, 1000, 10) == blob[1000:1010]
                    assert c.read_range(d, 2000, 10) == blob[2000:2010]
                assert served_blob_reads(origin) == 2 and not c.mirrors[0].healthy
                time.sleep(0.4)  # health_check_interval passed: the next read pings it and uses it again
                n = mirror.count("/blobs/")
                assert c.read_range(d, 3000, 10) == blob[3000:3010]
                assert mirror.count("/blobs/") == n + 1 and c.mirrors[0].healthy

                mirror_reg.stop()
                assert c.read_range(d, 4000, 10) == blob[4000:4010]
                assert served_blob_reads(origin) == 3
    finally:
        mirror_reg.stop()


def _hosts_toml(root: Path, origin_host: str, body: str) -> Path:
    name, _, port = origin_host.rpartition(":")
    d = root / f"{name}_{port}_"
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(body)
    return root


def test_hosts_toml_tls_mirror_with_own_ca_and_basic_auth(
    tmp_path: Path, registry: Registry, basic_registry: Registry, pki: Pki,
    docker_config: Callable[..., Path],
) -> None:
    """Per-mirror CA (``ca``) and a mirror that asks for its own credentials (found for the mirror host)."""
    tls_registry = start_registry(tmp_path / "tls", tls=(pki.server.cert, pki.server.key))
    try:
        _tls_and_basic_mirrors(tmp_path, registry, tls_registry, basic_registry, pki, docker_config)
    finally:
        tls_registry.stop()


def _tls_and_basic_mirrors(
    tmp_path: Path, registry: Registry, tls_registry: Registry, basic_registry: Registry, pki: Pki,
    docker_config: Callable[..., Path],
) -> None:
    data = os.urandom(40_000)
    with RegistryClient(tls_registry.host, REPO, ca_files=[str(pki.ca.cert)]) as c:
        c.push_blob(data)
    docker_config(basic_registry.host)
    creds = hook_credentials()
    with RegistryClient(basic_registry.host, REPO, plain_http=True, credentials_provider=creds) as c:
        c.push_blob(data)
    with FaultyProxy(registry.url) as origin:  # anonymous origin that does not even have the blob
        root = _hosts_toml(tmp_path / "certs.d", origin.host, (
            f'[host."https://{tls_registry.host}"]\n  ca = "{pki.ca.cert}"\n'
            f'[host."http://{basic_registry.host}"]\n'
        ))
        mirrors = from_hosts_dir(root, origin.host)
        with RegistryClient(origin.host, REPO, plain_http=True, mirrors=mirrors,
                            credentials_provider=hook_credentials()) as c:
            assert c.read_range(digest(data), 10, 10) == data[10:20]  # the TLS mirror, verified by its CA
            served = f'GET /v2/{REPO}/blobs/{digest(data)} HTTP/1.1" 206 10'
            assert served in tls_registry.log_path.read_text()
            assert c.mirrors[0].healthy
            tls_registry.stop()
            assert c.read_range(digest(data), 20, 10) == data[20:30]  # then the basic-auth mirror
            # Only the mirror host has credentials in the docker config: the basic-auth mirror got those.
            assert origin.count("/blobs/") == 0
