"""Registry auth through containerd, the snapshotter and nydusd-py.

containerd fetches manifest and bootstrap itself (``rpull --user``); the daemon's blob reads are
authorised with what the snapshotter found in the docker config of its environment
(``DOCKER_CONFIG``) and wrote into the daemon's JSON config.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_remote_helpers import Stack, docker_config, md5, push_nydus, source_file, template
from remote_helpers import PASSWORD, USER
from token_server import TokenServer

from nydus_core.testing.services import Registry

pytestmark = pytest.mark.containerd

WRONG = "wr0ng-Secret-42"


def _read_all(busybox_image: str, registry: Registry) -> tuple[str, str]:
    data = source_file(registry.url, busybox_image, "/data/random.bin")
    return md5(data), "/data/random.bin"


def _works(stack: Stack, ref: str, reg_host: str, tmp: Path, busybox_image: str, registry: Registry,
           name: str) -> str:  # fmt: skip
    want, path = _read_all(busybox_image, registry)
    env = {"DOCKER_CONFIG": str(docker_config(tmp / "docker", reg_host, USER, PASSWORD))}
    with stack.scenario(name, template("http"), env=env) as sc:
        sc.rpull(ref, "--plain-http", "--user", f"{USER}:{PASSWORD}")
        proc = sc.run(ref, "busybox", "md5sum", path, "/etc/hello.txt")
        assert proc.returncode == 0, proc.stderr + sc.logs()[-4000:]
        assert proc.stdout.split()[0] == want
        logs = sc.logs()
    assert PASSWORD not in logs
    return logs


def _refused(stack: Stack, ref: str, reg_host: str, tmp: Path, name: str) -> str:
    env = {"DOCKER_CONFIG": str(docker_config(tmp / "docker-wrong", reg_host, USER, WRONG))}
    with stack.scenario(name, template("http"), env=env) as sc:
        sc.rpull(ref, "--plain-http", "--user", f"{USER}:{PASSWORD}")  # containerd's own fetch is allowed
        started = time.monotonic()
        proc = sc.run(ref, "busybox", "cat", "/etc/hello.txt", timeout=60)
        elapsed = time.monotonic() - started
        assert proc.returncode != 0, proc.stdout
        assert elapsed < 30, f"a refused registry must fail fast, took {elapsed:.1f}s"
        # The daemon's config carries the (wrong) secret: private to root.
        configs = list((sc.root / "config").rglob("config.json"))
        assert configs and all(c.stat().st_mode & 0o777 == 0o600 for c in configs)
        logs = sc.logs() + stack.containerd.log_path.read_text(errors="replace")
    assert WRONG not in logs and PASSWORD not in logs
    return logs + proc.stderr


def test_basic_auth_from_docker_config(stack: Stack, basic_registry: Registry, busybox_image: str,
                                       registry: Registry, tmp_path: Path) -> None:  # fmt: skip
    ref = push_nydus(busybox_image, basic_registry.host, tmp_path / "push")
    _works(stack, ref, basic_registry.host, tmp_path, busybox_image, registry, "basic")
    err = _refused(stack, ref, basic_registry.host, tmp_path, "basicbad")
    assert basic_registry.host in err and "refused the credentials" in err, err[-3000:]
    assert "input/output error" in err  # the container's exec of /bin/busybox met EIO, not a hang


def test_token_auth_from_docker_config(
    stack: Stack, token_registry: Registry, token_server: TokenServer, busybox_image: str, registry: Registry,
    tmp_path: Path,
) -> None:
    ref = push_nydus(busybox_image, token_registry.host, tmp_path / "push")
    before = token_server.count("nydus-core")
    _works(stack, ref, token_registry.host, tmp_path, busybox_image, registry, "token")
    assert token_server.count("nydus-core") > before  # the daemon went through the token realm
    err = _refused(stack, ref, token_registry.host, tmp_path, "tokenbad")
    assert f"token server refused access to busybox on {token_registry.host} as 'alice'" in err, err[-3000:]
