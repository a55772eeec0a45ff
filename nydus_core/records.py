"""The named records plugins yield, and the objects behind them.

conda's ``conda/plugins`` is the model: a plugin does not answer "is this mine?" on every call;
it *declares* what it provides, once, as records with a name (`nydus_core.hookspecs`:
``nydus_backends``, ``nydus_formats``, ``nydus_decoders``, ``nydus_config_options``). The plugin
manager collects them into a `nydus_core.plugins.Registry` at start-up, rejects two records of one
kind with the same name (naming both distributions), and the core reaches each backend, format
and decoder only through its record, looked up by name.

Four kinds:

* `BackendRecord` -- a runtime backend, named by the upstream ``[daemon] fs_driver`` value it
  serves (``fusedev``, ``fscache``, ``blockdev``, ``proxy``, ... or a name of its own). Its
  `Backend` object implements the lifecycle of the daemons (or daemon-less mounts) that serve
  images; its `Capabilities` say what the core may ask of it.
* `FormatRecord` -- an image format (nydus, eStargz, zran, tarfs): how its layers are detected,
  claimed so containerd skips their download, and found under a container as a RAFS v6
  bootstrap that any backend can serve.
* `DecoderRecord` -- daemon side: turns the stored bytes of one chunk of one kind of blob into the
  chunk's data (native nydus chunks, eStargz gzip members, zran, raw tar ranges), so a daemon
  serves a bootstrap whatever format made it.
* `ConfigOption` -- a ``config.toml`` key that a plugin adds (our extensions); upstream's keys stay
  where upstream puts them, in `nydus_core.config`.

Every method of `Backend`, `ImageFormat` and `BlobDecoder` is synchronous (pluggy and the gRPC
worker threads call them) and may be called from several threads: an implementation that keeps
state locks it.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nydus_core.errors import FailedPrecondition

if TYPE_CHECKING:
    from nydus_core.config import SnapshotterConfig
    from nydus_core.control.daemons.model import DaemonRecord, Instance
    from nydus_core.control.snapshot.model import ChainEntry, ImageSource, Layer, LayerClaim
    from nydus_core.data.rafs.bootstrap import BlobEntry, ChunkInfo
    from nydus_core.plugins import TypedHooks

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _valid_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(f"record name {value!r} must be lowercase letters, digits, '_', '.' or '-'")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Capabilities:
    """What the core may ask of a backend; the manager never asks for more.

    :param daemon: images are served by daemon processes the backend starts (``False``: the
        backend serves them itself, for example through a kernel mount, and the daemon methods
        of `Backend` are never called).
    :param dedicated_daemon: one daemon per image (``daemon_mode = "dedicated"``, upstream's
        ``multiple``).
    :param shared_daemon: one daemon serves every image (``daemon_mode = "shared"``).
    :param failover: a dead daemon's mount can be taken over without unmounting
        (``recover_policy = "failover"``); without it that policy is served as ``restart``.
    :param hot_upgrade: running daemons can be moved onto another program
        (``PUT /api/v1/daemons/upgrade``).
    """

    daemon: bool = True
    dedicated_daemon: bool = True
    shared_daemon: bool = False
    failover: bool = False
    hot_upgrade: bool = False

    def names(self) -> list[str]:
        """The capabilities that are on, for listings (``no_daemon`` for a daemon-less backend)."""
        if not self.daemon:
            return ["no_daemon"]
        return [f.name for f in attrs.fields(type(self)) if getattr(self, f.name)]


@attrs.frozen
class BackendContext:
    """What the daemon manager hands a backend when it opens it (`Backend.open`).

    :param root: the snapshotter root directory.
    :param config: the configuration in force (plugin options included).
    :param hooks: the typed hook caller (``hooks.credentials(...)`` for registry credentials,
        ``hooks.daemon_event(...)``).
    :param daemons: the live daemon records of this backend, as the manager knows them now.
    :param ready_timeout: seconds a daemon gets to become ready.
    """

    root: Path
    config: SnapshotterConfig
    hooks: TypedHooks
    daemons: Callable[[], list[DaemonRecord]]
    ready_timeout: float = 10.0


class Backend:
    """The lifecycle of the daemons (or daemon-less mounts) that serve images.

    Subclass it and override what your backend does; the defaults do nothing or say "not
    supported". The daemon manager (`nydus_core.control.daemons.manager`) calls, for one image:

    1. `prepare` -- per-image files (a daemon config, cache files), the instance's mountpoint;
    2. with a daemon: `start` (a new daemon) then `wait_ready`; without one, nothing;
    3. `attach` -- in every daemon mode (``daemon`` is ``None`` without a daemon), then
       `wait_ready` again for a shared daemon;
    4. when the last snapshot using the image is gone: `detach`, and `stop` for a daemon that
       serves nothing any more (dedicated mode).

    Around that: `open`/`close` once per snapshotter run, `reconcile` + `alive` + `adopt` or
    `recover` for every recorded daemon at start-up, `restore` for every recorded daemon-less
    instance, `alive` and `recover` from the liveness monitor, `upgrade` on the system API.
    Daemons must outlive the snapshotter: running containers read through them.
    """

    ctx: BackendContext

    # -- the backend as a whole ---------------------------------------------------------------
    def open(self, ctx: BackendContext, recorded: Sequence[DaemonRecord]) -> None:
        """Called once, before any other method, when the manager first needs this backend
        (at start-up for the configured ``fs_driver`` and for every backend that recorded daemons
        name). `recorded` are this backend's daemon records as persisted; helpers that outlive
        the snapshotter (a session holder) are made to agree with them here."""
        self.ctx = ctx

    def close(self) -> None:
        """The snapshotter stops. Daemons (and helpers serving them) keep running."""

    def watch_pids(self) -> list[int]:
        """Extra processes the liveness monitor waits on besides the daemons; the death of one
        triggers a sweep at once."""
        return []

    def sweep(self) -> None:
        """One liveness sweep's look at the backend's own helpers (every few seconds, and at once
        after a watched process died)."""

    def purge(self, root: Path) -> None:
        """Stop whatever this backend keeps running for `root` besides its daemons (called when
        everything under a root is torn down: test teardown, an operator's clean-up; never when
        the snapshotter merely stops). May be called without `open`."""

    def check_upgrade(self) -> None:
        """Raise `FailedPrecondition` (with the reason) when `upgrade` cannot run now."""
        raise FailedPrecondition("this backend cannot hot-upgrade its daemons")

    # -- one image ----------------------------------------------------------------------------
    def prepare(
        self, instance: Instance, image: ImageSource, labels: Mapping[str, str], daemon: DaemonRecord | None
    ) -> None:
        """Write the per-image files the image needs (a daemon config, cache files) before it is
        attached; set ``instance.config_path``, ``instance.mountpoint`` or
        ``instance.backend_data`` (persisted with the instance). `daemon` is the daemon that will
        serve it (already running when shared), ``None`` without one. `labels` are the meta
        snapshot's labels (credentials, image reference)."""

    def attach(self, daemon: DaemonRecord | None, instance: Instance) -> None:
        """Make the image served at ``instance.mountpoint``: mount it in a shared daemon, or (no
        daemon) mount it yourself. Called in every mode; a dedicated daemon got its image when it
        started and usually has nothing to do. Failure is an exception."""

    def detach(self, daemon: DaemonRecord | None, instance: Instance) -> None:
        """Stop serving the image and remove its per-image files (the last snapshot using it is
        gone). For a dedicated daemon `stop` follows."""

    def restore(self, instance: Instance) -> bool:
        """Start-up, for a recorded instance without a daemon: make it serve again if its mount
        is gone. ``False`` forgets the instance."""
        return True

    # -- daemons (only when `Capabilities.daemon`) --------------------------------------------
    def start(self, daemon: DaemonRecord, instance: Instance | None) -> int:
        """Start the daemon's process (own session: it must outlive the snapshotter) and return
        its pid. `instance` is the image of a dedicated daemon, ``None`` for a shared one. May
        fill ``daemon.backend_data``; the record is saved afterwards."""
        raise NotImplementedError(f"{type(self).__name__} does not run daemons")

    def wait_ready(self, daemon: DaemonRecord, timeout: float) -> bool:
        """Block until the daemon serves; ``False`` when `timeout` seconds passed first (the
        manager reports it with the daemon's log directory). A daemon that exits meanwhile
        should raise at once, naming its exit status."""
        return True

    def alive(self, daemon: DaemonRecord) -> bool:
        """Whether the daemon is alive and serving (start-up and every liveness sweep)."""
        return True

    def reconcile(self, daemon: DaemonRecord) -> bool:
        """Start-up, before `alive`: make ``daemon.pid`` name the process that really serves it
        (a snapshotter killed mid-recovery leaves an unrecorded replacement) and stop any other
        process of this daemon. ``True`` when ``pid`` changed (the manager saves the record)."""
        return False

    def adopt(self, daemon: DaemonRecord) -> None:
        """Start-up: a recorded daemon was found alive and is served again by this snapshotter."""

    def stop(self, daemon: DaemonRecord) -> None:
        """Stop the daemon and clear what it leaves (mounts, sockets). Called when it serves
        nothing any more, to clear a dead daemon that is forgotten, and at test teardown; never
        when the snapshotter exits."""

    def recover(self, daemon: DaemonRecord, instances: Sequence[Instance]) -> bool:
        """Bring a dead daemon back per ``[daemon] recover_policy`` (``restart`` or ``failover``;
        ``none`` never gets here) with the images it served, in ``seq`` order. ``True`` when it
        serves again (``daemon`` updated in place, the manager saves it); ``False`` gives it up
        (the manager forgets it and its images)."""
        return False

    def upgrade(
        self, daemon: DaemonRecord, instances: Sequence[Instance], program: str, version: str
    ) -> None:
        """Move a running daemon onto `program` without unmounting (`check_upgrade` passed).
        On success update ``daemon`` in place (pid, program, version, ...). Failure is an
        exception whose message says which program serves the daemon afterwards: an
        implementation must leave the daemon served."""
        raise FailedPrecondition("this backend cannot hot-upgrade its daemons")

    def daemon_event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        """The manager persisted a change of one of this backend's daemons (``started``,
        ``ready``, ``died``, ``recovered``, ``upgraded``, ``stopped``); called before the
        broadcast ``nydus_daemon_event`` hook."""

    def describe(self, daemon: DaemonRecord) -> dict[str, Any]:
        """Extra fields of this daemon's entry in the system API's ``GET /api/v1/daemons``
        (upstream's ``supervisor_path``, for instance)."""
        return {}


@attrs.frozen
class BackendRecord:
    """A runtime backend.

    :param name: the ``[daemon] fs_driver`` value that selects it.
    :param backend: the object implementing the lifecycle.
    :param capabilities: what the core may ask of it.
    :param description: one line for ``--list-plugins``.
    """

    name: str = attrs.field(validator=_valid_name)
    backend: Backend
    capabilities: Capabilities = Capabilities()
    description: str = ""


# --------------------------------------------------------------------------------------------
# Image formats
# --------------------------------------------------------------------------------------------


@attrs.frozen
class FormatContext:
    """What the snapshotter hands an image format when it starts (`ImageFormat.open`).

    :param root: the snapshotter root directory.
    :param config: the configuration in force (plugin options included).
    :param hooks: the typed hook caller (``hooks.credentials(...)`` for registry credentials, as a
        format that reads layers from the registry needs).
    """

    root: Path
    config: SnapshotterConfig
    hooks: TypedHooks


class ImageFormat:
    """How one image format is detected and found as a RAFS v6 bootstrap.

    Formats are asked in `FormatRecord.priority` order (highest first; ties by name); the first
    answer that is not ``None`` wins.
    """

    ctx: FormatContext

    def open(self, ctx: FormatContext) -> None:
        """Called once when the snapshotter starts, for an enabled format, before any other
        method but `enabled`."""
        self.ctx = ctx

    def enabled(self, config: SnapshotterConfig) -> bool:
        """Whether the configuration switches this format on (``[experimental] enable_stargz``,
        for instance). A disabled format is never asked."""
        return True

    def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        """Called in ``Prepare`` of a layer containerd is about to unpack (labels carry
        ``containerd.io/snapshot.ref``). Return a `LayerClaim` to serve it lazily: the
        snapshotter commits it under ``layer.target`` and answers ``AlreadyExists``, so
        containerd skips the download. A format that turns the layer into a bootstrap (an
        eStargz TOC) writes it into ``layer.upper`` here. ``None``: not this format's layer."""
        return None

    def find_image(
        self, key: str, chain: Sequence[ChainEntry], config: SnapshotterConfig
    ) -> ImageSource | None:
        """Called in ``Prepare``/``View`` of a container or view snapshot and in ``Mounts``:
        the image beneath it, if this format serves it lazily. `chain` is the committed parents,
        nearest first. Return an `ImageSource` naming the meta snapshot and its RAFS v6 (or v5)
        bootstrap (and, if the format needs one, the backend to serve it); ``None`` otherwise."""
        return None


@attrs.frozen
class FormatRecord:
    """An image format.

    :param name: the format's name (``nydus``, ``estargz``, ...), also `ImageSource.format`.
    :param format: the object doing detection.
    :param priority: formats are asked highest first.
    :param description: one line for ``--list-plugins``.
    """

    name: str = attrs.field(validator=_valid_name)
    format: ImageFormat
    priority: int = 0
    description: str = ""


# --------------------------------------------------------------------------------------------
# Blob decoders (daemon side)
# --------------------------------------------------------------------------------------------


class BlobDecoder:
    """Turns the stored bytes of a chunk of one kind of blob into the chunk's data.

    The blob cache fetches `read_range`, calls `decode`, checks the result against the chunk's
    digest in the bootstrap, and only then caches or returns it: a decoder never has to verify.
    """

    def accepts(self, blob: BlobEntry) -> bool:
        """Whether this decoder reads chunks of `blob` (by its features or compressor)."""
        return False

    def read_range(self, blob: BlobEntry, chunk: ChunkInfo) -> tuple[int, int]:
        """``(offset, size)`` of the bytes of `blob` that `decode` needs for `chunk`."""
        return chunk.compressed_offset, chunk.compressed_size

    def decode(self, blob: BlobEntry, chunk: ChunkInfo, raw: bytes) -> bytes:
        """The chunk's ``uncompressed_size`` bytes from the `raw` bytes at `read_range`; raise
        ``nydus_core.data.rafs.RafsError`` naming blob and chunk when they cannot be decoded."""
        raise NotImplementedError


@attrs.frozen
class DecoderRecord:
    """A blob decoder.

    :param name: the decoder's name (``nydus-native``, ``estargz-gzip``, ...).
    :param decoder: the object.
    :param priority: when several accept a blob, the highest wins.
    :param description: one line for ``--list-plugins``.
    """

    name: str = attrs.field(validator=_valid_name)
    decoder: BlobDecoder
    priority: int = 0
    description: str = ""


# --------------------------------------------------------------------------------------------
# Configuration keys of plugins
# --------------------------------------------------------------------------------------------

OPTION_TYPES: tuple[builtins.type, ...] = (bool, int, float, str)


@attrs.frozen
class ConfigOption:
    """A ``config.toml`` key a plugin adds.

    :param section: the dotted table it lives in (``daemon``, ``experimental.tarfs``, or a table
        of the plugin's own).
    :param key: the key within the table.
    :param type: ``bool``, ``int``, ``float`` or ``str``; a value of another TOML type is refused
        at start-up with the file and the dotted key.
    :param default: the value when the file does not set it.
    :param description: what it does (shown in ``--list-plugins`` and in the docs).
    :param validator: raises `ValueError` for a value of the right type that is still wrong.
    """

    section: str
    key: str
    type: builtins.type = attrs.field()
    default: Any = None
    description: str = ""
    validator: Callable[[Any], None] | None = None

    @type.validator
    def _check_type(self, _attr: attrs.Attribute[builtins.type], value: builtins.type) -> None:
        if value not in OPTION_TYPES:
            raise ValueError(f"config option {self.section}.{self.key}: type must be bool, int, float or str")

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def name(self) -> str:
        return self.dotted

    def get(self, config: SnapshotterConfig) -> Any:
        """The value in `config` (the default when the file did not set it)."""
        return config.plugin_options.get(self.dotted, self.default)
