"""Real registries for the remote-client tests: plain, htpasswd basic auth, token realm, TLS.

Each is a genuine docker-registry process (`nydus_core.testing.services.Registry`) started once
per module; the token realm is `token_server.TokenServer`; certificates are made per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from remote_helpers import (
    PASSWORD,
    USER,
    Pki,
    make_pki,
    start_basic_auth_registry,
    start_registry,
    write_docker_config,
)
from token_server import TokenServer

from nydus_core.testing.services import Registry


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    return make_pki(d)


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry behind htpasswd basic auth (user `USER`, password `PASSWORD`)."""
    d = tmp_path_factory.mktemp("basic-registry")
    reg = start_basic_auth_registry(d, "nydus-test")
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def token_server(pki: Pki) -> Iterator[TokenServer]:
    server = TokenServer(pki.signing, {USER: PASSWORD}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[Registry]:
    """A registry whose ``auth: token:`` realm is `token_server`."""
    config = {"auth": token_server.registry_auth_config()}
    reg = start_registry(tmp_path_factory.mktemp("token-registry"), config)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("tls-registry"), tls=(pki.server.cert, pki.server.key))
    yield reg
    reg.stop()


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str, str], Path]:
    """Point ``DOCKER_CONFIG`` at a fresh directory holding one ``auths`` entry."""

    def make(host: str, user: str = USER, password: str = PASSWORD) -> Path:
        d = write_docker_config(tmp_path / "docker", host, user, password)
        monkeypatch.setenv("DOCKER_CONFIG", str(d))
        return d

    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "DOCKER_CONFIG" not in os.environ
    return make
