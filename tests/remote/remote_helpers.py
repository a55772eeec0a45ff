"""Shared helpers of the remote tests (importable by name; `conftest` is not, with several test dirs)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import attrs
from remote_pki import KeyPair

from nydus_core.plugins import build_plugin_manager
from nydus_core.remote import backend
from nydus_core.remote.credentials import Credentials
from nydus_core.testing.services import Registry

USER, PASSWORD = "alice", "s3cret-pa55"


@attrs.frozen
class Pki:
    ca: KeyPair
    server: KeyPair
    signing: KeyPair


def start_registry(workdir: Path, config: dict[str, object] | None = None,
                   tls: tuple[Path, Path] | None = None) -> Registry:
    reg = Registry(workdir, config=config, tls=tls)
    reg.start()
    return reg


def write_docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def hook_credentials(ref: str = "") -> Callable[[str], Credentials | None]:
    """What the snapshotter passes to the client: the ``nydus_credentials`` hook (labels, docker config)."""
    return backend.hook_credentials(build_plugin_manager(entry_points=False).hook, ref, {})
