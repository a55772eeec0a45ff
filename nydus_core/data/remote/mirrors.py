"""Registry mirrors, read the two ways users configure them, with health tracking.

1. nydusd's JSON ``device.backend.config.mirrors`` array (how Dragonfly's P2P mirror is set up):
   ``host`` (a URL), ``headers``, ``auth_through``, ``health_check_interval``, ``failure_limit``,
   ``ping_url``; nydus-core also reads ``ca_cert_files``, ``skip_verify`` and ``override_path``
   there, which is how the snapshotter passes hosts.toml mirrors on to the daemon.
2. containerd ``hosts.toml`` files under ``[remote.mirrors_config] dir``: the directory for a
   registry is ``<dir>/<host with ":port" → "_port_">``, else ``<dir>/<host>``, else
   ``<dir>/_default``; each ``[host."<scheme://host>"]`` section, in file order, is one mirror with
   ``ca``, ``skip_verify``, ``header``, ``capabilities``, ``override_path`` and the nydus-only
   ``health_check_interval``, ``failure_limit``, ``ping_url``. ``server`` is ignored, as upstream does.

A mirror is used while healthy. `failure_limit` consecutive failures (connection errors or 5xx)
mark it unhealthy; from then on it is pinged at most every `health_check_interval` seconds (lazily,
by the next read that would have used it, so no thread is left running) and used again once the
ping answers below 500.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import tomli

from nydus_core.data.remote.errors import redact_url

log = logging.getLogger(__name__)

DEFAULT_FAILURE_LIMIT = 5
DEFAULT_HEALTH_CHECK_INTERVAL = 5.0
_PING_TIMEOUT = 3.0


class MirrorConfigError(ValueError):
    """A mirrors configuration is malformed; the message names the file or key."""


@attrs.frozen
class MirrorConfig:
    """One mirror. `url` is the API root (``scheme://host[:port]`` + path, ``/v2`` not included)."""

    url: str
    headers: Mapping[str, str] = attrs.field(factory=dict)
    auth_through: bool = False
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    ping_url: str = ""
    ca_files: tuple[str, ...] = ()
    skip_verify: bool = False
    capabilities: tuple[str, ...] = ("pull", "resolve")
    #: With ``override_path`` (hosts.toml) the URL path already is the API root: no ``/v2`` is added.
    override_path: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def api_root(self) -> str:
        base = self.url.rstrip("/")
        if self.override_path:
            return base
        return base if base.endswith("/v2") else base + "/v2"


def _positive(value: Any, name: str, default: float) -> float:
    if value is None:
        return default
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise MirrorConfigError(f"mirror {name} must be a number, got {value!r}") from e
    if f < 0:
        raise MirrorConfigError(f"mirror {name} must not be negative, got {value!r}")
    return f


def _with_scheme(host: str, default_scheme: str = "https") -> str:
    return host if "://" in host else f"{default_scheme}://{host}"


def from_nydusd_json(mirrors: Sequence[Mapping[str, Any]] | None) -> list[MirrorConfig]:
    """Read nydusd's ``device.backend.config.mirrors``; entries with an empty ``host`` are skipped."""
    out: list[MirrorConfig] = []
    for i, entry in enumerate(mirrors or ()):
        if not isinstance(entry, Mapping):
            raise MirrorConfigError(f"mirrors[{i}] must be an object, got {type(entry).__name__}")
        host = str(entry.get("host") or "")
        if not host:
            continue
        headers = entry.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise MirrorConfigError(f"mirrors[{i}].headers must be an object")
        limit = int(_positive(entry.get("failure_limit"), "failure_limit", DEFAULT_FAILURE_LIMIT))
        ca = entry.get("ca_cert_files") or []
        if isinstance(ca, str):
            ca = [ca]
        if not isinstance(ca, list) or not all(isinstance(c, str) for c in ca):
            raise MirrorConfigError(f"mirrors[{i}].ca_cert_files must be a list of paths")
        out.append(
            MirrorConfig(
                url=_with_scheme(host),
                headers={str(k): str(v) for k, v in headers.items()},
                auth_through=bool(entry.get("auth_through", False)),
                health_check_interval=_positive(
                    entry.get("health_check_interval"), "health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL
                ),
                failure_limit=max(limit, 1),
                ping_url=str(entry.get("ping_url") or ""),
                ca_files=tuple(ca),
                skip_verify=bool(entry.get("skip_verify", False)),
                override_path=bool(entry.get("override_path", False)),
            )
        )
    return out


def hosts_dir_for(mirrors_dir: Path, registry_host: str) -> Path | None:
    """The directory whose ``hosts.toml`` configures `registry_host`, in upstream's lookup order."""
    candidates = []
    if ":" in registry_host:
        name, _, port = registry_host.rpartition(":")
        candidates.append(mirrors_dir / f"{name}_{port}_")
    candidates += [mirrors_dir / registry_host, mirrors_dir / "_default"]
    for c in candidates:
        if (c / "hosts.toml").is_file():
            return c
    return None


def _resolve_path(base: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else base / p)


def from_hosts_dir(mirrors_dir: Path, registry_host: str) -> list[MirrorConfig]:
    """Mirrors for `registry_host` from containerd ``hosts.toml`` files under `mirrors_dir` (may be none)."""
    found = hosts_dir_for(Path(mirrors_dir), registry_host)
    if found is None:
        return []
    path = found / "hosts.toml"
    try:
        doc = tomli.loads(path.read_text())
    except (OSError, tomli.TOMLDecodeError) as e:
        raise MirrorConfigError(f"{path}: {e}") from e
    hosts = doc.get("host") or {}
    if not isinstance(hosts, dict):
        raise MirrorConfigError(f"{path}: [host] must be a table of '[host.\"<url>\"]' sections")
    out: list[MirrorConfig] = []
    for url, section in hosts.items():  # tomli keeps file order
        if not isinstance(section, dict):
            raise MirrorConfigError(f"{path}: host {url!r} must be a table")
        where = f"{path} host {url!r}"
        ca = section.get("ca") or []
        if isinstance(ca, str):
            ca = [ca]
        if not isinstance(ca, list) or not all(isinstance(c, str) for c in ca):
            raise MirrorConfigError(f"{where}: ca must be a path or a list of paths")
        header = section.get("header") or {}
        if not isinstance(header, dict):
            raise MirrorConfigError(f"{where}: header must be a table")
        headers = {
            str(k): ", ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in header.items()
        }
        caps = section.get("capabilities", ["pull", "resolve"])
        if not isinstance(caps, list):
            raise MirrorConfigError(f"{where}: capabilities must be a list")
        try:
            limit = int(_positive(section.get("failure_limit"), "failure_limit", DEFAULT_FAILURE_LIMIT))
            interval = _positive(
                section.get("health_check_interval"), "health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL
            )
        except MirrorConfigError as e:
            raise MirrorConfigError(f"{where}: {e}") from e
        out.append(
            MirrorConfig(
                url=_with_scheme(str(url)),
                headers=headers,
                # A hosts.toml mirror is a host of its own: it gets credentials only when it asks.
                auth_through=True,
                health_check_interval=interval,
                failure_limit=max(limit, 1),
                ping_url=str(section.get("ping_url") or ""),
                ca_files=tuple(_resolve_path(found, c) for c in ca),
                skip_verify=bool(section.get("skip_verify", False)),
                capabilities=tuple(str(c) for c in caps),
                override_path=bool(section.get("override_path", False)),
            )
        )
    return out


class MirrorHealth:
    """Consecutive-failure counter and lazy re-check of one mirror; thread-safe."""

    def __init__(self, config: MirrorConfig, clock: Any = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._healthy = True
        self._last_check = 0.0

    @property
    def healthy(self) -> bool:
        return self._healthy

    def success(self) -> None:
        with self._lock:
            self._failures = 0

    def failure(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            if self._healthy and self._failures >= self.config.failure_limit:
                self._healthy = False
                self._last_check = self._clock()
                log.warning(
                    "mirror %s disabled after %d consecutive failures (last: %s); reads go to the origin",
                    redact_url(self.config.url), self._failures, reason,
                )

    def usable(self, http: httpx.Client) -> bool:
        """True when healthy; when not, ping it if `health_check_interval` has passed since the last check."""
        with self._lock:
            if self._healthy:
                return True
            if self._clock() - self._last_check < self.config.health_check_interval:
                return False
            self._last_check = self._clock()
        ping = self.config.ping_url or self.config.api_root + "/"
        try:
            ok = http.get(ping, timeout=_PING_TIMEOUT).status_code < 500
        except httpx.HTTPError:
            ok = False
        if ok:
            with self._lock:
                self._healthy = True
                self._failures = 0
            log.info("mirror %s is healthy again", redact_url(self.config.url))
        return ok
