"""Credentials providers: snapshot labels and the docker config file.

Providers return `Credentials` or ``None`` ("ask the next one"). An empty username means the
secret is a bearer/identity token (nydusd's ``registry_token``). Nothing here logs a secret;
`Credentials.__repr__` hides it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nydus_core import labels as L
from nydus_core.data.remote.credentials import Credentials

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
# Every spelling of Docker Hub found as an `auths` key or a reference host.
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


def from_labels(labels: Mapping[str, str]) -> Credentials | None:
    """``containerd.io/snapshot/pullusername`` + ``pullsecret`` (both must be present)."""
    if L.PULL_USERNAME in labels and L.PULL_SECRET in labels:
        return Credentials(username=labels[L.PULL_USERNAME], secret=labels[L.PULL_SECRET])
    return None


def normalize_host(name: str) -> str:
    """``https://index.docker.io/v1/`` → ``docker.io``; ``http://h:5000/x`` → ``h:5000``."""
    host = name.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".docker" / "config.json"


def _entry_credentials(entry: Mapping[str, Any], path: Path, key: str) -> Credentials | None:
    token = entry.get("identitytoken") or entry.get("identityToken")
    if token:
        return Credentials(username="", secret=str(token))
    auth = entry.get("auth")
    if auth:
        try:
            decoded = base64.b64decode(str(auth), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            log.warning("docker config %s: auths[%r].auth is not base64 'user:password'; ignored", path, key)
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            log.warning("docker config %s: auths[%r].auth has no ':' separator; ignored", path, key)
            return None
        return Credentials(username=user, secret=password)
    if entry.get("username") is not None and entry.get("password") is not None:
        return Credentials(username=str(entry["username"]), secret=str(entry["password"]))
    return None


def from_docker_config(host: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Look `host` up in ``auths`` of ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.

    Keys are compared after normalisation, so ``docker.io`` finds ``https://index.docker.io/v1/``.
    Credential helpers (``credsStore``/``credHelpers``) are not run.
    """
    path = docker_config_path(env)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("docker config %s is unreadable (%s); ignored", path, type(e).__name__)
        return None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    want = normalize_host(host)
    exact = [k for k in auths if k == host]
    for key in exact + [k for k in auths if k not in exact and normalize_host(k) == want]:
        entry = auths[key]
        if isinstance(entry, dict):
            creds = _entry_credentials(entry, path, key)
            if creds is not None:
                return creds
    return None
