"""Pull-through mirrors end to end: the nydusd JSON ``mirrors`` array and hosts.toml.

The origin is the bearer-token registry; the mirror a second docker-registry in proxy mode that
pulls from it with its own credentials. A counting `FaultyProxy` sits in front of each, and the
image reference names the origin's proxy, so every request the daemon makes is seen. A container
keeps running while the mirror is stopped; its next read falls back to the origin.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_remote_helpers import Scenario, Stack, docker_config, md5, push_nydus, source_file, template
from remote_helpers import PASSWORD, USER, start_registry
from token_server import TokenServer

from nydus_core.testing.proxy import Fault, FaultyProxy
from nydus_core.testing.services import Registry, wait_until

pytestmark = pytest.mark.containerd


def served_blob_reads(proxy: FaultyProxy) -> int:
    """Blob GETs answered with data (a 401 starting the token flow is not a read)."""
    return sum(
        1 for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path and r.status in (200, 206)
    )


@pytest.fixture(scope="module")
def token_ref(busybox_image: str, token_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    return push_nydus(busybox_image, token_registry.host, tmp_path_factory.mktemp("mirror-push"))


@pytest.fixture
def origin(token_registry: Registry, token_ref: str) -> Iterator[FaultyProxy]:
    with FaultyProxy(token_registry.url) as p:
        yield p


@pytest.fixture
def mirror_registry(tmp_path: Path, token_registry: Registry) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "mirror", {
        "proxy": {"remoteurl": token_registry.url, "username": USER, "password": PASSWORD},
    })  # fmt: skip
    yield reg
    reg.stop()


@pytest.fixture
def mirror(mirror_registry: Registry) -> Iterator[FaultyProxy]:
    with FaultyProxy(mirror_registry.url) as p:
        yield p


def _ref(origin: FaultyProxy, token_ref: str) -> str:
    return f"{origin.host}/{token_ref.split('/', 1)[1]}"


def _reads_then_mirror_dies(sc: Scenario, ref: str, origin: FaultyProxy, mirror: FaultyProxy,
                            mirror_registry: Registry, want: str) -> None:  # fmt: skip
    """Reads go to the mirror; with the mirror stopped under a running container they go to the origin."""
    sc.rpull(ref, "--plain-http", "--user", f"{USER}:{PASSWORD}")
    origin.reset_requests()  # from here on, only the daemon talks to the registries
    mirror.reset_requests()
    cid = sc.start(ref)
    first = sc.exec(cid, "cat", "/etc/hello.txt")
    assert first.returncode == 0 and "hello from layer1" in first.stdout, first.stderr + sc.logs()[-3000:]
    assert served_blob_reads(mirror) > 0
    assert origin.count("/blobs/") == 0, [r.path for r in origin.requests]
    # The next blob request to the mirror is held for a while; the container starts reading, the
    # mirror is stopped under that read, and the held request then finds it gone.
    held = mirror.add_fault(Fault("delay", path_contains="/blobs/", seconds=1.5, times=1))
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(sc.exec, cid, "busybox", "md5sum", "/data/random.bin")
        # (the proxy counts a fault down when a request takes it, before the delay)
        wait_until(lambda: held.times == 0 or reading.done(), 10, "the container's read to reach the mirror",
                   interval=0.02)  # fmt: skip
        assert not reading.done()
        mirror_registry.stop()
        second = reading.result(timeout=120)
    mirror_reads = served_blob_reads(mirror)
    assert second.returncode == 0, second.stderr + sc.logs()[-3000:]
    assert second.stdout.split()[0] == want
    assert served_blob_reads(origin) > 0
    assert served_blob_reads(mirror) == mirror_reads
    # failure_limit = 1: one request met the dead mirror, then it was skipped for the origin.
    assert sum(1 for r in mirror.requests if r.status >= 500) == 1


def test_json_mirrors_array(stack: Stack, token_ref: str, origin: FaultyProxy, mirror: FaultyProxy,
                            mirror_registry: Registry, token_server: TokenServer, busybox_image: str,
                            registry: Registry, tmp_path: Path) -> None:  # fmt: skip
    """``auth_through = false``: the daemon gets its token from the origin's realm (after asking the
    origin which realm) and the origin serves no blob."""
    want = md5(source_file(registry.url, busybox_image, "/data/random.bin"))
    ref = _ref(origin, token_ref)
    env = {"DOCKER_CONFIG": str(docker_config(tmp_path / "docker", origin.host, USER, PASSWORD))}
    mirrors = [{"host": mirror.url, "auth_through": False, "failure_limit": 1, "health_check_interval": 60,
                "headers": {"X-Nydus-E2E": "mirror"}}]  # fmt: skip
    tokens_before = token_server.count("nydus-core")
    with stack.scenario("jsonmirror", template("http", mirrors=mirrors), env=env) as sc:
        _reads_then_mirror_dies(sc, ref, origin, mirror, mirror_registry, want)
        assert token_server.count("nydus-core") > tokens_before
        blob_gets = [r for r in mirror.requests if "/blobs/" in r.path]
        assert all(r.header("x-nydus-e2e") == "mirror" for r in blob_gets)
        assert origin.count("/v2/") > 0  # the origin was asked (for its auth challenge) all along
        assert PASSWORD not in sc.logs()


def test_hosts_toml_mirror(stack: Stack, token_ref: str, origin: FaultyProxy, mirror: FaultyProxy,
                           mirror_registry: Registry, busybox_image: str, registry: Registry,
                           tmp_path: Path) -> None:  # fmt: skip
    want = md5(source_file(registry.url, busybox_image, "/data/random.bin"))
    ref = _ref(origin, token_ref)
    env = {"DOCKER_CONFIG": str(docker_config(tmp_path / "docker", origin.host, USER, PASSWORD))}
    host, port = origin.host.rsplit(":", 1)
    conf = tmp_path / "certs.d" / f"{host}_{port}_"
    conf.mkdir(parents=True)
    (conf / "hosts.toml").write_text(
        f'server = "{origin.url}"\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
        "  failure_limit = 1\n  health_check_interval = 60\n"
    )
    toml = f'[remote.mirrors_config]\ndir = "{tmp_path / "certs.d"}"\n'
    with stack.scenario("hostsmirror", template("http"), toml=toml, env=env) as sc:
        _reads_then_mirror_dies(sc, ref, origin, mirror, mirror_registry, want)
