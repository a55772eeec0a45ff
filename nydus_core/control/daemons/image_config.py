"""The per-image nydusd JSON config (upstream ``SupplementDaemonConfig``).

The template is ``[daemon] nydusd_config`` (a JSON file); when that file does not exist a
built-in registry-backend template is used so that a fresh install works. Into a deep copy of it
go the registry host and repository parsed from the image reference, ``device.id``, the cache
directory and credentials. The result may contain secrets, so it is written atomically with mode
0600 and never logged.

From the snapshotter's ``[remote]`` section: ``skip_ssl_verify`` sets the backend's
``skip_verify``, and the ``hosts.toml`` mirrors of ``[remote.mirrors_config] dir`` for the image's
registry are passed through as ``mirrors`` entries (after the template's own). Upstream HEAD instead
picks the first healthy one and rewrites ``host``; passing them all keeps the daemon's per-read
health tracking, so a mirror that dies while containers read falls back to the origin. Each entry
carries the mirror's ``ca_cert_files`` and ``skip_verify`` (nydus-core extension keys).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nydus_core.config import RemoteConfig
from nydus_core.data.remote.mirrors import MirrorConfig, MirrorConfigError, from_hosts_dir
from nydus_core.data.remote.reference import parse_ref

if TYPE_CHECKING:
    from nydus_core.plugins import TypedHooks
from nydus_core.errors import ConfigError

# A registry-backed FUSE config in upstream's v1 JSON schema (misc/snapshotter/nydusd-config.fusedev.json).
DEFAULT_TEMPLATE: dict[str, Any] = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {
                "scheme": "",
                "skip_verify": False,
                "timeout": 5,
                "connect_timeout": 5,
                "retry_limit": 4,
            },
        },
        "cache": {"type": "blobcache", "config": {"work_dir": ""}},
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "amplify_io": 1048576,
    "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1048576, "prefetch_all": True},
}


def load_template(path: Path) -> dict[str, Any]:
    """The JSON template at `path`, or the built-in one when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return copy.deepcopy(DEFAULT_TEMPLATE)
    except OSError as e:
        raise ConfigError(f"[daemon] nydusd_config {path}: cannot read: {e}") from e
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"[daemon] nydusd_config {path}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"[daemon] nydusd_config {path}: the top level must be a JSON object")
    return doc


def _obj(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    child = parent.setdefault(key, {})
    if not isinstance(child, dict):
        raise ConfigError(f"nydusd config template: {where}.{key} must be a JSON object")
    return child


def build_config(
    template: Mapping[str, Any],
    *,
    image_ref: str,
    rafs_key: str,
    cache_dir: Path,
    labels: Mapping[str, str],
    hooks: TypedHooks,
    remote: RemoteConfig | None = None,
) -> dict[str, Any]:
    """Fill a copy of `template` for one image; credentials come from `nydus_credentials` (`hooks`).

    `remote` is the snapshotter's ``[remote]`` section (TLS skip and hosts.toml mirrors).
    """
    doc = copy.deepcopy(dict(template))
    device = _obj(doc, "device", "")
    backend = _obj(device, "backend", "device")
    backend_cfg = _obj(backend, "config", "device.backend")
    cache_cfg = _obj(_obj(device, "cache", "device"), "config", "device.cache")
    device["id"] = f"/{rafs_key}"
    cache_cfg["work_dir"] = str(cache_dir)
    if backend.get("type", "registry") == "registry":
        ref = parse_ref(image_ref)
        backend_cfg["host"] = ref.api_host
        backend_cfg["repo"] = ref.repo
        creds = hooks.credentials(host=ref.host, ref=image_ref, labels=dict(labels))
        if creds is not None:
            if creds.username:
                backend_cfg["auth"] = base64.b64encode(f"{creds.username}:{creds.secret}".encode()).decode()
                backend_cfg.pop("registry_token", None)
            else:
                backend_cfg["registry_token"] = creds.secret
                backend_cfg.pop("auth", None)
        if remote is not None:
            _apply_remote(backend_cfg, remote, ref.host)
    return doc


def _mirror_entry(m: MirrorConfig) -> dict[str, Any]:
    """One hosts.toml mirror as a nydusd JSON ``mirrors`` entry."""
    entry: dict[str, Any] = {
        "host": m.url,
        "headers": dict(m.headers),
        "auth_through": m.auth_through,
        "health_check_interval": m.health_check_interval,
        "failure_limit": m.failure_limit,
        "ping_url": m.ping_url,
    }
    if m.ca_files:
        entry["ca_cert_files"] = list(m.ca_files)
    if m.skip_verify:
        entry["skip_verify"] = True
    if m.override_path:
        entry["override_path"] = True
    return entry


def _apply_remote(backend_cfg: dict[str, Any], remote: RemoteConfig, registry_host: str) -> None:
    if remote.skip_ssl_verify:
        backend_cfg["skip_verify"] = True
    mirrors_dir = remote.mirrors_config.dir
    if mirrors_dir is None:
        return
    try:
        found = from_hosts_dir(Path(mirrors_dir), registry_host)
    except MirrorConfigError as e:
        raise ConfigError(f"[remote.mirrors_config] dir: {e}") from e
    pulling = [m for m in found if "pull" in m.capabilities]
    if not pulling:
        return
    existing = backend_cfg.get("mirrors") or []
    if not isinstance(existing, list):
        raise ConfigError("nydusd config template: device.backend.config.mirrors must be a JSON array")
    backend_cfg["mirrors"] = [*existing, *(_mirror_entry(m) for m in pulling)]


def write_private_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write `doc` to `path` atomically (temp file + rename) with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".tmp")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
