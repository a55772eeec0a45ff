"""Auth and TLS against real registries: htpasswd basic, a bearer-token realm, a custom-CA TLS registry.

Credentials come from a docker config file through the ``nydus_credentials`` hook, as in the
snapshotter. Wrong credentials must give a `RegistryAuthError` naming host and repository and
never the secret.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from remote_helpers import PASSWORD, USER, Pki, hook_credentials
from token_server import TokenServer

from nydus_core.data.remote.errors import RegistryAuthError, RegistryError
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.testing.services import Registry

WRONG = "definitely-wrong-pw"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_basic_auth_with_docker_config(basic_registry: Registry, docker_config: Callable[..., Path]) -> None:
    docker_config(basic_registry.host)
    data = os.urandom(100_000)
    with RegistryClient(basic_registry.host, "private/app", plain_http=True,
                        credentials_provider=hook_credentials()) as c:
        assert c.push_blob(data) == (digest(data), True)
        assert c.read_range(digest(data), 10, 1000) == data[10:1010]
        assert c.auth.token_requests == 0


def test_basic_auth_wrong_password_is_a_clear_error(
    basic_registry: Registry, docker_config: Callable[..., Path]
) -> None:
    docker_config(basic_registry.host, USER, WRONG)
    with RegistryClient(basic_registry.host, "private/app", plain_http=True,
                        credentials_provider=hook_credentials()) as c, pytest.raises(RegistryAuthError) as e:
        c.blob_size(digest(b"x"))
    msg = str(e.value)
    assert basic_registry.host in msg and "private/app" in msg and WRONG not in msg


def test_basic_auth_without_credentials_names_the_host(
    basic_registry: Registry, docker_config: Callable[..., Path]
) -> None:
    with RegistryClient(basic_registry.host, "private/app", plain_http=True,
                        credentials_provider=hook_credentials()) as c, pytest.raises(RegistryAuthError) as e:
        c.ping()
    assert "no credentials" in str(e.value) and basic_registry.host in str(e.value)


def test_bearer_token_flow_and_cache(
    token_registry: Registry, token_server: TokenServer, docker_config: Callable[..., Path]
) -> None:
    docker_config(token_registry.host)
    data = os.urandom(300_000)
    with RegistryClient(token_registry.host, "private/tok", plain_http=True,
                        credentials_provider=hook_credentials()) as c:
        assert c.push_blob(data) == (digest(data), True)
        before = c.auth.token_requests
        for off in range(0, 200_000, 20_000):
            assert c.read_range(digest(data), off, 1000) == data[off : off + 1000]
        # One pull token for all the reads (the push token had another scope).
        assert c.auth.token_requests == before + 1
    granted = [r for r in token_server.requests if r.granted and r.scope == "repository:private/tok:pull"]
    assert granted and all(r.user == USER for r in granted)


def test_bearer_token_refused_is_refreshed_once(
    token_registry: Registry, token_server: TokenServer, docker_config: Callable[..., Path]
) -> None:
    docker_config(token_registry.host)
    data = os.urandom(5000)
    with RegistryClient(token_registry.host, "private/refresh", plain_http=True,
                        credentials_provider=hook_credentials()) as c:
        c.push_blob(data)
        token_server.issue_expired = 1  # the next (pull) token is dead on arrival, though cached as valid
        assert c.read_range(digest(data), 0, 100) == data[:100]
        n = c.auth.token_requests
        assert c.read_range(digest(data), 100, 100) == data[100:200]
        assert c.auth.token_requests == n  # the refreshed token was cached
    pulls = [r for r in token_server.requests if r.scope == "repository:private/refresh:pull"]
    assert len(pulls) == 2  # the dead token, then exactly one refresh after the registry's 401


def test_bearer_wrong_password_is_a_clear_error(
    token_registry: Registry, token_server: TokenServer, docker_config: Callable[..., Path]
) -> None:
    docker_config(token_registry.host, USER, WRONG)
    with RegistryClient(token_registry.host, "private/tok", plain_http=True,
                        credentials_provider=hook_credentials()) as c, pytest.raises(RegistryAuthError) as e:
        c.read_range(digest(b"y"), 0, 1)
    msg = str(e.value)
    assert token_registry.host in msg and "private/tok" in msg and WRONG not in msg and PASSWORD not in msg
    assert token_server.requests[-1].granted is False


def test_bearer_anonymous_refused(token_registry: Registry, docker_config: Callable[..., Path]) -> None:
    with RegistryClient(token_registry.host, "private/tok", plain_http=True,
                        credentials_provider=hook_credentials()) as c, pytest.raises(RegistryAuthError) as e:
        c.ping()
    assert "anonymously" in str(e.value)


def test_tls_with_custom_ca(tls_registry: Registry, pki: Pki) -> None:
    data = os.urandom(50_000)
    with RegistryClient(tls_registry.host, "tls/app", ca_files=[str(pki.ca.cert)]) as c:
        assert c.scheme == "https"
        c.push_blob(data)
        assert c.read_range(digest(data), 5, 5) == data[5:10]
    with RegistryClient(tls_registry.host, "tls/app", retries=3) as c, pytest.raises(RegistryError) as e:
        c.blob_size(digest(data))
    assert "TLS verification" in str(e.value) and tls_registry.host in str(e.value)
    with RegistryClient(tls_registry.host, "tls/app", skip_verify=True) as c:
        assert c.blob_size(digest(data)) == len(data)


def test_daemon_config_from_the_snapshotter_builds_a_working_client(
    basic_registry: Registry, docker_config: Callable[..., Path], tmp_path: Path
) -> None:
    """The snapshotter's nydusd JSON (credentials put in ``auth`` by the hook) drives the daemon's client."""
    from nydus_core.control.daemons.image_config import DEFAULT_TEMPLATE, build_config
    from nydus_core.data.remote.backend import BackendConfigError, client_from_backend_config
    from nydus_core.plugins import build_plugin_manager

    docker_config(basic_registry.host)
    data = os.urandom(70_000)
    with RegistryClient(basic_registry.host, "private/daemon", plain_http=True,
                        credentials_provider=hook_credentials()) as c:
        c.push_blob(data)
    template = {**DEFAULT_TEMPLATE}
    template["device"] = {**DEFAULT_TEMPLATE["device"], "backend": {
        "type": "registry", "config": {"scheme": "http", "timeout": 5, "retry_limit": 1}}}
    doc = build_config(template, image_ref=f"{basic_registry.host}/private/daemon:latest", rafs_key="k",
                       cache_dir=tmp_path, labels={}, hooks=build_plugin_manager(entry_points=False).typed)
    cfg = doc["device"]["backend"]["config"]
    assert cfg["auth"] and PASSWORD not in str(doc)  # base64 only, as upstream writes it
    with client_from_backend_config(cfg) as c:
        assert c.read_range(digest(data), 1, 3) == data[1:4]
    with pytest.raises(BackendConfigError, match="host"):
        client_from_backend_config({"repo": "x"})


def test_threads_starting_together_share_one_token(
    token_registry: Registry, docker_config: Callable[..., Path]
) -> None:
    import threading

    docker_config(token_registry.host)
    data = os.urandom(64_000)
    with RegistryClient(token_registry.host, "private/threads", plain_http=True,
                        credentials_provider=hook_credentials()) as c:
        c.push_blob(data)
    errors: list[BaseException] = []
    with RegistryClient(token_registry.host, "private/threads", plain_http=True,
                        credentials_provider=hook_credentials()) as c:
        start = threading.Barrier(8)

        def read(k: int) -> None:
            try:
                start.wait(10)
                assert c.read_range(digest(data), k * 1000, 1000) == data[k * 1000 : (k + 1) * 1000]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert c.auth.token_requests == 1
