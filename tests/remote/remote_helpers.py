"""Shared helpers of the remote tests (importable by name; `conftest` is not, with several test dirs)."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from remote_pki import KeyPair, make_ca, make_server_cert, make_signing_cert

from nydus_core.data.remote import backend
from nydus_core.data.remote.credentials import Credentials
from nydus_core.plugins import build_plugin_manager
from nydus_core.testing.services import Registry

USER, PASSWORD = "alice", "s3cret-pa55"


@attrs.frozen
class Pki:
    ca: KeyPair
    server: KeyPair
    signing: KeyPair


def make_pki(directory: Path) -> Pki:
    """A test CA, a server certificate it signs, and a token-signing certificate."""
    ca, ca_key = make_ca(directory)
    return Pki(ca=ca, server=make_server_cert(directory, ca, ca_key), signing=make_signing_cert(directory))


def start_registry(workdir: Path, config: dict[str, Any] | None = None,
                   tls: tuple[Path, Path] | None = None) -> Registry:
    reg = Registry(workdir, config=config, tls=tls)
    reg.start()
    return reg


def start_basic_auth_registry(workdir: Path, realm: str) -> Registry:
    """A registry behind htpasswd basic auth for `USER` / `PASSWORD`."""
    line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True)
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(line.stdout)
    return start_registry(workdir, {"auth": {"htpasswd": {"realm": realm, "path": str(htpasswd)}}})


def write_docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def hook_credentials(ref: str = "") -> Callable[[str], Credentials | None]:
    """What the snapshotter passes to the client: the ``nydus_credentials`` hook (labels, docker config)."""
    return backend.hook_credentials(build_plugin_manager(entry_points=False).hook, ref, {})
