"""Build a `RegistryClient` from what the daemon is given: nydusd's ``device.backend.config`` JSON.

The snapshotter fills that object (``host``, ``repo``, ``auth`` = base64 ``user:password`` or
``registry_token``) from the template in ``[daemon] nydusd_config``; the user's template supplies
``scheme``, ``skip_verify``, ``ca_cert_files``, ``timeout``, ``connect_timeout``, ``retry_limit``
and ``mirrors``. Mirrors from a ``[remote.mirrors_config] dir`` (hosts.toml) are appended after
the JSON ones when `mirrors_dir` is given.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nydus_core.data.remote.credentials import Credentials
from nydus_core.data.remote.mirrors import MirrorConfigError, from_hosts_dir, from_nydusd_json
from nydus_core.data.remote.registry import RegistryClient


class BackendConfigError(ValueError):
    """``device.backend.config`` is unusable; the message names the key (never a secret)."""


def static_credentials(creds: Credentials | None) -> Callable[[str], Credentials | None]:
    """A provider that hands the same credentials to every host of one client (origin and realm)."""
    return lambda host: creds


def hook_credentials(hook: Any, ref: str, labels: Mapping[str, str]) -> Callable[[str], Credentials | None]:
    """A provider asking the ``nydus_credentials`` hook (``pm.hook``) for each registry host."""

    def provider(host: str) -> Credentials | None:
        result: Credentials | None = hook.nydus_credentials(host=host, ref=ref, labels=dict(labels))
        return result

    return provider


def credentials_from_backend_config(cfg: Mapping[str, Any]) -> Credentials | None:
    """``auth`` (base64 ``user:password``) or ``registry_token``; ``None`` when neither is set."""
    auth = cfg.get("auth")
    if auth:
        try:
            user, sep, secret = base64.b64decode(str(auth), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise BackendConfigError("device.backend.config.auth is not base64 'user:password'") from e
        if not sep:
            raise BackendConfigError("device.backend.config.auth has no ':' between user and password")
        return Credentials(username=user, secret=secret)
    token = cfg.get("registry_token")
    if token:
        return Credentials(username="", secret=str(token))
    return None


def _number(cfg: Mapping[str, Any], key: str, default: float) -> float:
    value = cfg.get(key)
    if value in (None, 0):  # nydusd treats 0 as "no explicit value"
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise BackendConfigError(f"device.backend.config.{key} must be a number, got {value!r}") from e


def client_from_backend_config(
    cfg: Mapping[str, Any],
    *,
    credentials_provider: Callable[[str], Credentials | None] | None = None,
    mirrors_dir: Path | None = None,
) -> RegistryClient:
    """A client for a registry backend config.

    Explicit ``auth``/``registry_token`` win over `credentials_provider`.
    """
    host, repo = cfg.get("host"), cfg.get("repo")
    if not host or not repo:
        raise BackendConfigError("device.backend.config needs 'host' and 'repo' for a registry backend")
    scheme = str(cfg.get("scheme") or "https")
    if scheme not in ("http", "https"):
        raise BackendConfigError(f"device.backend.config.scheme must be http or https, got {scheme!r}")
    ca = cfg.get("ca_cert_files") or []
    if isinstance(ca, str):
        ca = [ca]
    creds = credentials_from_backend_config(cfg)
    provider = static_credentials(creds) if creds is not None else credentials_provider
    try:
        mirrors = from_nydusd_json(cfg.get("mirrors"))
        if mirrors_dir is not None:
            mirrors += from_hosts_dir(mirrors_dir, str(host))
    except MirrorConfigError as e:
        raise BackendConfigError(f"device.backend.config.mirrors: {e}") from e
    return RegistryClient(
        str(host), str(repo),
        credentials_provider=provider,
        scheme=scheme,
        ca_files=[str(c) for c in ca],
        skip_verify=bool(cfg.get("skip_verify", False)),
        timeout=_number(cfg, "timeout", 30.0),
        connect_timeout=_number(cfg, "connect_timeout", 5.0),
        retries=int(_number(cfg, "retry_limit", 3)),
        mirrors=mirrors,
    )
