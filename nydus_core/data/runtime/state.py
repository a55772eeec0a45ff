"""Daemon state shared by the API server and the filesystem backend.

States follow upstream: INIT while starting, RUNNING once the backend serves. Images are keyed by
their mount id: ``""`` for the image a dedicated daemon got on its command line, the snapshot id
for images attached to a shared daemon through ``POST /api/v1/mount?mountpoint=/<id>``.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from nydus_core.data.decoders import DecoderSet
from nydus_core.data.rafs import RafsError
from nydus_core.data.runtime import __version__
from nydus_core.data.runtime.instance import RafsInstance, merge_counts
from nydus_core.data.runtime.nydusd_json import ConfigInvalid, NydusdConfig, RegistryFactory

log = logging.getLogger(__name__)

STATE_INIT = "INIT"
STATE_READY = "READY"
STATE_RUNNING = "RUNNING"


class ApiError(Exception):
    """An API request failed; `status` is the HTTP status, `code` upstream's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@functools.cache
def git_commit() -> str:
    """The commit of the checkout this code runs from (upstream prints it in ``--version``).

    Asked once per process: it runs ``git`` (tens of milliseconds), which a pre-started daemon
    does before it is needed."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else "unknown"


def version_info() -> dict[str, str]:
    return {
        "package_ver": f"nydusd-py {__version__}",
        "git_commit": git_commit(),
        "build_time": "",
        "profile": "release",
        "rustc": "",
    }


Listener = Callable[[str, RafsInstance | None], None]


class DaemonRuntime:
    """The set of served images plus daemon state; thread safe."""

    def __init__(self, daemon_id: str = "", *, shared: bool, registry_factory: RegistryFactory | None = None,
                 prefetch_files: list[str] | None = None,
                 decoders: DecoderSet | Callable[[], DecoderSet] | None = None) -> None:  # fmt: skip
        """:param decoders: the blob decoders images are read with, or a function returning them
            (asked when the first image is opened; native nydus chunks only when ``None``)."""
        self.id = daemon_id
        self.shared = shared
        self.state = STATE_INIT
        # Extra fields of ``GET /api/v1/daemon`` (ours, not upstream's): a supervised daemon
        # says ``takeover_ready`` once a takeover would not wait for imports and image loading.
        self.info_extra: dict[str, Any] = {}
        self.version = version_info()
        self.registry_factory = registry_factory
        self.decoders = decoders
        self.prefetch_files = prefetch_files or []
        self._lock = threading.Lock()
        self.instances: dict[str, RafsInstance] = {}
        # mount id -> a number never reused within this process (backends build inode numbers
        # from it, so an image attached again under the same id cannot meet stale kernel inodes)
        self.slots: dict[str, int] = {}
        self.by_slot: dict[int, RafsInstance] = {}
        self._next_slot = 0
        self.listeners: list[Listener] = []
        # mount id -> (bootstrap, config JSON): what a takeover daemon needs to serve it again
        self.specs: dict[str, tuple[str, str]] = {}
        # Session actions a daemon program registers (upstream's ``sendfd``, ``takeover``,
        # ``start``, ``exit``); absent when the program offers none (nydusd-py: without
        # ``--supervisor``).
        self.actions: dict[str, Callable[[], None]] = {}

    def _open(self, bootstrap: str, config_text: str) -> RafsInstance:
        try:
            config = NydusdConfig.from_json(config_text)
        except ConfigInvalid as e:
            raise ApiError(400, "EINVAL", str(e)) from e
        try:
            decoders = self.decoders() if callable(self.decoders) else self.decoders
            inst = RafsInstance(bootstrap, config, registry_factory=self.registry_factory,
                                prefetch_files=self.prefetch_files, decoders=decoders)  # fmt: skip
        except FileNotFoundError as e:
            raise ApiError(404, "ENOENT", f"bootstrap {bootstrap}: {e.strerror}") from e
        except (RafsError, ConfigInvalid) as e:
            raise ApiError(400, "EINVAL", f"bootstrap {bootstrap}: {e}") from e
        except OSError as e:
            raise ApiError(500, "EIO", f"bootstrap {bootstrap}: {e}") from e
        return inst

    def add(
        self,
        mount_id: str,
        bootstrap: str,
        config_text: str,
        slot: int | None = None,
        *,
        prefetch: bool = True,
    ) -> RafsInstance:
        """Open and register an image (`mount_id` "" for a dedicated daemon's own image).

        `slot` is given only by a takeover, which must reuse the dead daemon's inode numbers.
        A warm standby opens images with `prefetch` off: the serving daemon prefetches them.
        """
        if self.shared and not mount_id:
            raise ApiError(400, "EINVAL", "a shared daemon mounts images at /<id>, not at /")
        if "/" in mount_id or mount_id in (".", ".."):
            raise ApiError(400, "EINVAL", f"invalid mountpoint /{mount_id}")
        with self._lock:
            if mount_id in self.instances:
                raise ApiError(409, "EEXIST", f"/{mount_id} is already mounted")
        inst = self._open(bootstrap, config_text)
        with self._lock:
            if mount_id in self.instances:
                inst.close()
                raise ApiError(409, "EEXIST", f"/{mount_id} is already mounted")
            if slot is None or slot in self.by_slot:
                self._next_slot += 1
                slot = self._next_slot
            self._next_slot = max(self._next_slot, slot)
            self.instances[mount_id] = inst
            self.slots[mount_id] = slot
            self.by_slot[slot] = inst
            self.specs[mount_id] = (bootstrap, config_text)
        if prefetch:
            inst.start_prefetch()
        for cb in self.listeners:
            cb(mount_id, inst)
        log.info("mounted /%s from %s (%d blob(s))", mount_id, bootstrap, len(inst.caches))
        return inst

    def remove(self, mount_id: str) -> None:
        with self._lock:
            inst = self.instances.pop(mount_id, None)
            slot = self.slots.pop(mount_id, None)
            self.specs.pop(mount_id, None)
            if slot is not None:
                self.by_slot.pop(slot, None)
        if inst is None:
            raise ApiError(404, "ENOENT", f"/{mount_id} is not mounted")
        for cb in self.listeners:
            cb(mount_id, None)
        inst.close()
        log.info("umounted /%s", mount_id)

    def mounts_state(self) -> list[dict[str, Any]]:
        """The served images as a takeover daemon needs them (id, bootstrap, config, slot)."""
        with self._lock:
            return [{"id": mid, "source": src, "config": cfg, "slot": self.slots[mid]}
                    for mid, (src, cfg) in sorted(self.specs.items())]  # fmt: skip

    def action(self, name: str) -> None:
        """Run a session action (the ``/api/v1/daemon/...`` PUT endpoints)."""
        fn = self.actions.get(name)
        if fn is None:
            raise ApiError(400, "EINVAL", f"{name} is not offered by this daemon")
        fn()

    def get(self, mount_id: str) -> RafsInstance | None:
        return self.instances.get(mount_id)

    def _select(self, sid: str | None) -> list[tuple[str, RafsInstance]]:
        with self._lock:
            items = list(self.instances.items())
        if sid is None:
            return items
        found = [(k, v) for k, v in items if k == sid]
        if not found:
            raise ApiError(404, "ENOENT", f"no image mounted at /{sid}")
        return found

    def metrics(self, kind: str, sid: str | None) -> Any:
        chosen = self._select(sid)
        docs = [getattr(inst, f"{kind}_metrics")(f"/{k}" if k else "/") for k, inst in chosen]
        if sid is not None:
            return docs[0]
        merged = merge_counts(docs)
        merged["id"] = "/"
        if kind == "blobcache":
            merged.setdefault("underlying_files", [])
        return merged

    def daemon_info(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "state": self.state, **self.info_extra}

    def close(self) -> None:
        with self._lock:
            items = list(self.instances.values())
            self.instances.clear()
        for inst in items:
            inst.close()
