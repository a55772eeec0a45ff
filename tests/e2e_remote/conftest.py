"""Fixtures of the remote end-to-end tests (auth, TLS, mirrors, integrity through containerd).

Registries, the token server and the test PKI are the ones `tests/remote` uses; its helper
modules are imported from there by name (they are plain modules, not conftest). Test modules
import helpers from `e2e_remote_helpers`, never from ``conftest`` (several test dirs have one).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "remote"))

from e2e_remote_helpers import NYDUS_TAG, Stack, convert
from remote_helpers import PASSWORD, USER, Pki, make_pki, start_basic_auth_registry, start_registry
from token_server import TokenServer

from nydus_core.testing.services import Registry, unmount_below


@pytest.fixture(scope="session")
def e2e_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("e2e-pki")
    return make_pki(d)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """containerd 1.6 with the ``nydus`` proxy plugin; each test starts its own snapshotter."""
    if shutil.which("ctr-remote") is None:
        pytest.fail("ctr-remote missing: apt-get install stargz-snapshotter")
    d = Path(tempfile.mkdtemp(prefix="e2er-", dir="/tmp"))
    s = Stack(d)
    s.start()
    yield s
    s.stop()
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def plain_nydus(busybox_image: str) -> str:
    """The busybox image converted to nydus in the session's plain registry."""
    return convert(busybox_image, busybox_image.rsplit(":", 1)[0] + ":" + NYDUS_TAG, "--plain-http")


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry behind htpasswd basic auth (`USER` / `PASSWORD`)."""
    d = tmp_path_factory.mktemp("e2e-basic")
    reg = start_basic_auth_registry(d, "nydus-e2e")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_server(e2e_pki: Pki) -> Iterator[TokenServer]:
    server = TokenServer(e2e_pki.signing, {USER: PASSWORD}).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[Registry]:
    """A registry whose bearer-token realm is `token_server`."""
    reg = start_registry(tmp_path_factory.mktemp("e2e-token"), {"auth": token_server.registry_auth_config()})
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory, e2e_pki: Pki) -> Iterator[Registry]:
    """An https registry whose certificate is signed by the test CA (no trust store knows it)."""
    reg = start_registry(tmp_path_factory.mktemp("e2e-tls"), tls=(e2e_pki.server.cert, e2e_pki.server.key))
    yield reg
    reg.stop()
