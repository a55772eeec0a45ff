"""nydusd's v1 JSON config (the part a RAFS instance needs), parsed with clear errors.

Upstream keys (reference §4.2): ``device.backend.{type,config}``, ``device.cache.{type,config.work_dir}``,
``digest_validate``, ``amplify_io``, ``fs_prefetch.{enable,threads_count,prefetch_all,merging_size}``.
One key is ours: ``amplify_across_files``, the bytes an amplified read may take past the end of the
file being read (`nydus_core.data.cache.blobcache`); nydusd ignores it. Unknown keys are ignored, as
nydusd does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nydus_core.data.cache.blobcache import DEFAULT_AMPLIFY_ACROSS_FILES, DEFAULT_AMPLIFY_IO
from nydus_core.data.cache.source import ChunkSource, LocalFsSource, RegistrySource


class ConfigInvalid(ValueError):
    """The nydusd JSON config is malformed; the message names the key."""


@dataclass
class PrefetchConfig:
    enable: bool = False
    threads_count: int = 2
    prefetch_all: bool = False
    merging_size: int = DEFAULT_AMPLIFY_IO


@dataclass
class NydusdConfig:
    """One image's daemon config."""

    backend_type: str
    backend_config: dict[str, Any]
    cache_type: str = "blobcache"
    work_dir: str = ""
    digest_validate: bool = False
    amplify_io: int = DEFAULT_AMPLIFY_IO
    amplify_across_files: int = DEFAULT_AMPLIFY_ACROSS_FILES
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    device_id: str = ""

    @classmethod
    def from_json(cls, text: str | bytes) -> NydusdConfig:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigInvalid(f"nydusd config is not valid JSON: {e}") from e
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> NydusdConfig:
        if not isinstance(doc, Mapping):
            raise ConfigInvalid("nydusd config: the top level must be a JSON object")
        device = _obj(doc, "device", "")
        backend = _obj(device, "backend", "device")
        btype = backend.get("type")
        if btype not in ("localfs", "registry"):
            raise ConfigInvalid(f"device.backend.type {btype!r} is not supported (localfs, registry)")
        bcfg = dict(_obj(backend, "config", "device.backend"))
        cache = _obj(device, "cache", "device")
        ctype = cache.get("type", "blobcache") or "blobcache"
        if ctype not in ("blobcache", "filecache", "dummycache", ""):
            raise ConfigInvalid(f"device.cache.type {ctype!r} is not supported (blobcache)")
        work_dir = _obj(cache, "config", "device.cache").get("work_dir", "")
        if not isinstance(work_dir, str) or not work_dir:
            raise ConfigInvalid("device.cache.config.work_dir must name the cache directory")
        pf = _obj(doc, "fs_prefetch", "")
        amplify = doc.get("amplify_io", DEFAULT_AMPLIFY_IO)
        if not isinstance(amplify, int) or amplify < 0:
            raise ConfigInvalid(f"amplify_io must be a non-negative integer, not {amplify!r}")
        across = doc.get("amplify_across_files", DEFAULT_AMPLIFY_ACROSS_FILES)
        if not isinstance(across, int) or isinstance(across, bool) or across < 0:
            raise ConfigInvalid(f"amplify_across_files must be a non-negative integer, not {across!r}")
        return cls(
            backend_type=btype,
            backend_config=bcfg,
            cache_type=ctype,
            work_dir=work_dir,
            digest_validate=bool(doc.get("digest_validate", False)),
            amplify_io=amplify,
            amplify_across_files=across,
            prefetch=PrefetchConfig(
                enable=bool(pf.get("enable", False)),
                threads_count=max(1, int(pf.get("threads_count", 2) or 2)),
                prefetch_all=bool(pf.get("prefetch_all", False)),
                merging_size=int(pf.get("merging_size", DEFAULT_AMPLIFY_IO) or DEFAULT_AMPLIFY_IO),
            ),
            device_id=str(device.get("id", "")),
        )


def _obj(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    child = parent.get(key, {})
    if child is None:
        return {}
    if not isinstance(child, Mapping):
        raise ConfigInvalid(f"nydusd config: {where + '.' if where else ''}{key} must be a JSON object")
    return child


RegistryFactory = Callable[[Mapping[str, Any]], ChunkSource]


def registry_source(cfg: Mapping[str, Any]) -> ChunkSource:
    """The ``registry`` backend: `nydus_core.data.remote`'s client built from ``device.backend.config``."""
    from nydus_core.data.remote.backend import BackendConfigError, client_from_backend_config

    try:
        client = client_from_backend_config(cfg)
    except (BackendConfigError, ValueError) as e:
        raise ConfigInvalid(f"device.backend.config: {e}") from e
    return RegistrySource(client.read_range, client.close)


def make_source(config: NydusdConfig, registry_factory: RegistryFactory | None = None) -> ChunkSource:
    """The chunk source for the config's backend."""
    cfg = config.backend_config
    if config.backend_type == "localfs":
        blob_dir, blob_file = cfg.get("dir"), cfg.get("blob_file")
        if not blob_dir and not blob_file:
            raise ConfigInvalid("device.backend.config: localfs needs dir (or blob_file)")
        return LocalFsSource(str(blob_dir) if blob_dir else None, str(blob_file) if blob_file else None)
    return (registry_factory or registry_source)(cfg)
