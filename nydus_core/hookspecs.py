"""Every hook of nydus-core, in one documented place.

A plugin is any module or object with functions named like the specs below and decorated with
`nydus_core.hookimpl`. Built-in behaviour is registered through these same hooks (the modules in
`nydus_core.plugins.BUILTIN_PLUGINS`), so a third-party plugin can replace any of it. Plugins are
found through the entry-point group ``nydus_core.plugins`` (see `nydus_core.plugins`).

Three families, as the design card names them:

* **image detection** - `nydus_formats` yields the image formats (`nydus_core.records.FormatRecord`):
  how a layer is claimed so containerd skips its download, and how the image beneath a container
  is found as a RAFS v6 bootstrap;
* **mount production** - `nydus_mounts` builds the exact `containerd.types.Mount` list of a
  snapshot;
* **daemon lifecycle** - `nydus_backends` yields the runtime backends
  (`nydus_core.records.BackendRecord`), keyed by the ``fs_driver`` they serve; the daemon manager
  drives each daemon only through its backend's record (start, wait ready, attach/detach,
  liveness, stop, recover, hot upgrade).

plus `nydus_decoders` (daemon side: how a chunk of each kind of blob is decoded),
`nydus_config_options` (the ``config.toml`` keys a plugin adds), broadcast events and a
credentials hook.

Rules every implementation follows:

* hooks are synchronous (pluggy does not await coroutines); a plugin with async internals runs
  its own loop or thread and returns plain values;
* record hooks (``nydus_backends``, ...) are called once, when the plugin manager is built: they
  yield records and should import their heavy parts lazily (a daemon process builds a plugin
  manager too, for its decoders);
* ``firstresult`` hooks return ``None`` for "not mine", so the next plugin is asked;
* an exception raised by a hook or a record's method fails the gRPC call that triggered it with a
  clear status (``Internal`` unless it is a ``nydus_core.errors`` error), it never kills the
  snapshotter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from nydus_core.config import SnapshotterConfig
    from nydus_core.control.daemons.model import DaemonRecord
    from nydus_core.control.snapshot.model import Info, Mount, MountRequest
    from nydus_core.data.remote.credentials import Credentials
    from nydus_core.records import BackendRecord, ConfigOption, DecoderRecord, FormatRecord

PROJECT = "nydus_core"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Records (called once, when the plugin manager is built)
# --------------------------------------------------------------------------------------------


@hookspec
def nydus_formats() -> Iterable[FormatRecord]:
    """Yield the image formats this plugin provides (image detection).

    Called once per plugin when the plugin manager is built. Each `FormatRecord` names a format
    and carries its `ImageFormat`: the snapshotter asks enabled formats, highest ``priority``
    first, whether they claim a layer containerd is about to unpack (``claim_layer``) and which
    image lies beneath a container (``find_image``). Two records with one name are a start-up
    error naming both distributions.

    :return: an iterable of `FormatRecord` (a generator is fine).
    """
    return ()


@hookspec
def nydus_backends() -> Iterable[BackendRecord]:
    """Yield the runtime backends this plugin provides (daemon lifecycle).

    Called once per plugin when the plugin manager is built. A `BackendRecord` is named by the
    ``[daemon] fs_driver`` value that selects it and carries the `Backend` object the daemon
    manager drives, and its `Capabilities`. A configured ``fs_driver`` that no record names stops
    start-up with the installed names and the pip extra that provides it; two records with one
    name are a start-up error naming both distributions.

    :return: an iterable of `BackendRecord`.
    """
    return ()


@hookspec
def nydus_decoders() -> Iterable[DecoderRecord]:
    """Yield the blob decoders this plugin provides (daemon side).

    Called once when a daemon program (``nydusd-py``) builds its plugin manager: for every blob
    of a bootstrap the accepting decoder with the highest ``priority`` turns the stored bytes of
    a chunk into its data (native nydus chunk, eStargz gzip member, zran, raw tar range).

    :return: an iterable of `DecoderRecord`.
    """
    return ()


@hookspec
def nydus_config_options() -> Iterable[ConfigOption]:
    """Yield the ``config.toml`` keys this plugin adds.

    Called once when the plugin manager is built, before the configuration is read: a key a
    plugin registers is parsed and type-checked like the core's (a wrong type stops start-up
    naming the file and the dotted key) instead of being warned about as unknown. Upstream's keys
    are the core's; register only your extensions.

    :return: an iterable of `ConfigOption`.
    """
    return ()


# --------------------------------------------------------------------------------------------
# Mount production
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def nydus_mounts(request: MountRequest, config: SnapshotterConfig) -> list[Mount] | None:
    """Build the mount list containerd receives for a snapshot.

    Called by ``Prepare``, ``View`` and ``Mounts``. The built-in overlay producer runs last and
    reproduces containerd's overlayfs snapshotter exactly (``bind`` without parents, ``overlay``
    with ``workdir=``/``upperdir=``/``lowerdir=`` otherwise, the image mountpoint as the lower dir
    when an image is served lazily). A plugin overrides it for, e.g., Kata volumes or
    ``fuse.nydus-overlayfs``.

    :param request: the snapshot: id, key, kind, upper/work dirs, parent dirs nearest first,
        labels; when a backend serves the chain also the image, its mountpoint and its
        `Instance` (``fs_driver`` names the backend, ``backend_data`` holds what the backend
        recorded for it, as an EROFS or Kata mount needs).
    :param config: the snapshotter configuration.
    :return: the mounts in order, or ``None`` to let the next producer decide.
    """


# --------------------------------------------------------------------------------------------
# Events (broadcast: every implementation is called; return values are ignored)
# --------------------------------------------------------------------------------------------


@hookspec
def nydus_snapshotter_started(root: str, config: SnapshotterConfig) -> None:
    """The snapshotter finished start-up (metastore open, daemons recovered, socket listening)."""


@hookspec
def nydus_snapshotter_stopping(root: str) -> None:
    """The snapshotter is shutting down (daemons keep running)."""


@hookspec
def nydus_snapshot_committed(info: Info, remote: bool) -> None:
    """A snapshot was committed; ``remote`` is true for a layer claimed by a format plugin."""


@hookspec
def nydus_snapshot_removed(info: Info) -> None:
    """A snapshot's record was removed (its directory goes at once or in ``Cleanup``)."""


@hookspec
def nydus_daemon_event(daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
    """A daemon changed state. ``event`` is one of ``started``, ``ready``, ``died``,
    ``recovered``, ``upgraded``, ``stopped``; ``detail`` carries event-specific facts (pid, error, ...)."""


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def nydus_credentials(host: str, ref: str, labels: Mapping[str, str]) -> Credentials | None:
    """Find registry credentials for a host.

    Called whenever the snapshotter or a daemon config needs to authenticate against a registry.
    Built-in providers, in priority order: snapshot labels (``pullusername``/``pullsecret``),
    then the docker config (``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``).

    :param host: the registry host as it appears in references (``docker.io`` is not rewritten).
    :param ref: the full image reference.
    :param labels: the labels of the snapshot being served (may be empty).
    :return: `Credentials`, or ``None`` to ask the next provider (anonymous when none answers).
    """
