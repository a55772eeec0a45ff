"""Every hook of nydus-core, in one documented place.

A plugin is any module or object with functions named like the specs below and decorated with
`nydus_core.hookimpl`. Built-in behaviour is registered through these same hooks (see
`nydus_core.builtin`), so a third-party plugin can replace any of it. Plugins are found through the
entry-point group ``nydus_core.plugins`` (see `nydus_core.plugins`).

Three families, as the design card names them:

* **image detection** - which format serves a layer lazily, and which image a container's parent
  chain holds;
* **mount production** - the exact `containerd.types.Mount` list for a snapshot;
* **daemon lifecycle** - start, wait-ready, attach/detach an image, liveness, stop, recover,
  hot upgrade.

plus broadcast events and a credentials hook.

Rules every implementation follows:

* hooks are synchronous (pluggy does not await coroutines); a plugin with async internals runs
  its own loop or thread and returns plain values;
* ``firstresult`` hooks return ``None`` for "not mine", so the next plugin is asked; lifecycle
  hooks receive the daemon record and answer only for their own ``fs_driver``;
* an exception raised by a hook fails the gRPC call that triggered it with a clear status
  (``Internal`` unless it is a ``nydus_core.errors`` error), it never kills the snapshotter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from nydus_core.config import SnapshotterConfig
    from nydus_core.control.daemons.model import DaemonRecord, Instance
    from nydus_core.control.snapshot.model import (
        ChainEntry,
        ImageSource,
        Info,
        Layer,
        LayerClaim,
        Mount,
        MountRequest,
    )
    from nydus_core.data.remote.credentials import Credentials

PROJECT = "nydus_core"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Image detection
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def nydus_claim_layer(layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
    """Decide whether a layer containerd is about to unpack is served lazily instead.

    Called during ``Prepare`` of a read-only unpack snapshot, that is one whose labels carry
    ``containerd.io/snapshot.ref``, after the active snapshot has been created.

    :param layer: the layer: its key, parent, target chain ID, labels and the active snapshot's id
        and upper directory (a plugin may write files there, e.g. a bootstrap built from an
        eStargz TOC; they become part of the committed snapshot).
    :param config: the snapshotter configuration.
    :return: a `LayerClaim` to take the layer: the snapshotter commits it under the target name
        with all labels plus the claim's and answers ``AlreadyExists`` so containerd skips the
        download. ``None`` lets the next plugin decide; when nobody claims it containerd
        downloads and unpacks the layer as with the overlayfs snapshotter.
    """


@hookspec(firstresult=True)
def nydus_find_image(
    key: str, chain: Sequence[ChainEntry], config: SnapshotterConfig
) -> ImageSource | None:
    """Find the lazily served image beneath a writable (container) or view snapshot.

    Called during ``Prepare`` and ``View`` of a snapshot whose labels do not carry
    ``containerd.io/snapshot.ref``, and again in ``Mounts`` when the image instance is gone.

    :param key: the new snapshot's key.
    :param chain: the committed ancestors, nearest parent first, with their labels and dirs.
    :param config: the snapshotter configuration.
    :return: the `ImageSource` (the meta snapshot and its bootstrap) to mount through a
        backend, or ``None`` when the chain is plain OCI (native overlay mounts).
    """


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
        labels, and the image mountpoint when a backend serves the chain.
    :param config: the snapshotter configuration.
    :return: the mounts in order, or ``None`` to let the next producer decide.
    """


# --------------------------------------------------------------------------------------------
# Daemon lifecycle
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def nydus_daemon_start(
    daemon: DaemonRecord, instance: Instance | None, config: SnapshotterConfig
) -> int | None:
    """Start the process of a daemon.

    Called when an image needs a dedicated daemon, when the shared daemon is first needed, and to
    respawn a dead daemon (policy ``restart``) or a replacement (``failover``, hot upgrade).

    :param daemon: the record: id, fs driver, mode, API socket, mountpoint, config and log dirs,
        program to run (``--nydusd-path``).
    :param instance: the image to serve for a dedicated daemon, ``None`` for a shared one.
    :param config: the snapshotter configuration.
    :return: the pid of the started process, or ``None`` if this plugin does not handle the
        daemon's ``fs_driver``.
    """


@hookspec(firstresult=True)
def nydus_daemon_wait_ready(daemon: DaemonRecord, timeout: float) -> bool | None:
    """Block until a started daemon serves (upstream: ``GET /api/v1/daemon`` says ``RUNNING``).

    Called after `nydus_daemon_start` and after every attach, before mounts are returned to
    containerd (which reads the root filesystem at once).

    :param daemon: the daemon record.
    :param timeout: seconds to wait at most.
    :return: ``True`` when ready, ``False`` when it did not get ready in time (the caller turns
        that into an error naming the daemon), ``None`` if not this plugin's daemon.
    """


@hookspec(firstresult=True)
def nydus_instance_attach(daemon: DaemonRecord, instance: Instance) -> bool | None:
    """Mount one image in a running daemon (shared mode: ``POST /api/v1/mount``).

    Called after the daemon is ready, for every image a shared daemon must serve, and again for
    each instance (in ``seq`` order) when a shared daemon was respawned.

    :return: ``True`` once the image is mounted at ``instance.mountpoint``; ``None`` if not this
        plugin's daemon. Failure is an exception.
    """


@hookspec(firstresult=True)
def nydus_instance_detach(daemon: DaemonRecord, instance: Instance) -> bool | None:
    """Unmount one image from a daemon (shared mode: ``DELETE /api/v1/mount``).

    Called when the last snapshot using the image is removed (from ``Cleanup``).

    :return: ``True`` when done, ``None`` if not this plugin's daemon.
    """


@hookspec(firstresult=True)
def nydus_daemon_alive(daemon: DaemonRecord) -> bool | None:
    """Probe whether a daemon is alive and serving.

    Called when the snapshotter starts (to sort recorded daemons into live and dead) and by the
    liveness monitor.

    :return: ``True``/``False``, or ``None`` if not this plugin's daemon.
    """


@hookspec(firstresult=True)
def nydus_daemon_reconcile(daemon: DaemonRecord) -> bool | None:
    """Make a recorded daemon's ``pid`` name the process that really serves it, at start-up.

    Called once per recorded daemon when the snapshotter starts, before `nydus_daemon_alive`. A
    snapshotter killed in the middle of a recovery (failover or restart) leaves a replacement
    process that was spawned but never recorded: the implementation finds the daemon's processes
    (the default: by the API socket on their command line), sets ``daemon.pid`` to the one that
    serves or will serve (the one bound to the API socket, else the newest), and stops the others,
    so that no orphan survives. `nydus_daemon_recover` then drives an adopted replacement on
    (takeover, start) instead of spawning another one.

    :param daemon: the record as persisted; ``pid`` may be changed in place.
    :return: ``True`` when ``daemon.pid`` changed (the manager persists it), ``False`` when it
        already named the right process or none was found, ``None`` if not this plugin's daemon.
    """


@hookspec(firstresult=True)
def nydus_daemon_stop(daemon: DaemonRecord) -> bool | None:
    """Stop a daemon and unmount what it serves.

    Called when its last instance is gone (dedicated mode), never on snapshotter exit: running
    containers must survive a snapshotter restart.

    :return: ``True`` when stopped, ``None`` if not this plugin's daemon.
    """


@hookspec(firstresult=True)
def nydus_daemon_recover(
    daemon: DaemonRecord, instances: Sequence[Instance], config: SnapshotterConfig
) -> bool | None:
    """Bring a recorded daemon back after a snapshotter restart or the daemon's death.

    Called for every recorded daemon that `nydus_daemon_alive` reports dead, with the recorded
    instances it served, according to ``[daemon] recover_policy``. The default respawns it
    (`nydus_daemon_start`) after clearing stale mounts and sockets and re-attaches instances.

    :return: ``True`` when it serves again, ``False`` when it was given up, ``None`` if not this
        plugin's daemon.
    """


@hookspec(firstresult=True)
def nydus_daemon_upgrade(
    daemon: DaemonRecord, instances: Sequence[Instance], program: str, version: str, config: SnapshotterConfig
) -> bool | None:
    """Hand a running daemon's mount over to another daemon program without unmounting (hot upgrade).

    Called by the daemon manager for every daemon, one at a time, on the system controller's
    ``PUT /api/v1/daemons/upgrade``; only under ``recover_policy = "failover"`` (a supervisor holds
    the session). No liveness recovery, attach or release runs on the daemon meanwhile.

    :param daemon: the running daemon; on success the implementation updates it in place (pid,
        API socket, program, version) and the manager persists it.
    :param instances: the images it serves, in ``seq`` order.
    :param program: path of the new daemon program (checked to be an executable file).
    :param version: the version the caller expects the new program to report (empty: any); a
        mismatch must fail before the old daemon is touched.
    :param config: the snapshotter configuration.
    :return: ``True`` when the new program serves, ``None`` if not this plugin's daemon. Failure is
        an exception whose message says which program serves the daemon afterwards: an
        implementation must leave a daemon serving (the old one, or the old program again).
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
