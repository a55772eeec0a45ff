"""`NydusdBackend`: the part of a backend that runs a nydusd-compatible daemon program.

Upstream's FUSE, fscache and virtiofs drivers all run the same kind of program (a real ``nydusd``
or our ``nydusd-py``) with upstream's command line and HTTP API over a unix socket; only the
subcommand and what happens around a death differ. This base class holds what they share, so a
backend plugin subclasses it and adds its own (``plugins/fuse``: failover, warm standby, hot
upgrade):

* `prepare`: the per-image nydusd JSON (`image_config`) and the blob meta files in the cache;
* `start`: upstream's argv (`command_line`) in its own session; ``[daemon] nydusd_path`` names
  the program;
* `wait_ready`: ``GET /api/v1/daemon`` until it says ``RUNNING`` (`on_running` then);
* `attach`/`detach`: ``POST``/``DELETE /api/v1/mount`` for a shared daemon;
* `alive`, `reconcile` (by the API socket on the command line), `stop` (SIGTERM, then SIGKILL,
  then clearing the mounts and the socket it leaves);
* `recover`: respawn on the same mountpoint after clearing it, as upstream's ``restart``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons import process
from nydus_core.control.daemons.client import (
    STATE_RUNNING,
    NydusdApiError,
    NydusdClient,
    NydusdUnreachable,
)
from nydus_core.control.daemons.image_config import build_config, load_template, write_private_json
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.control.daemons.mounts import is_mounted, umount_tree
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.errors import FailedPrecondition, Unavailable
from nydus_core.records import Backend, BackendContext

log = logging.getLogger(__name__)

RECOVER_READY_TIMEOUT = 10.0


def copy_blob_meta(image: ImageSource, snapshot_dir: Path, cache: Path) -> None:
    """Copy the image's ``*.blob.meta`` files into the cache dir (as upstream does).

    The meta layer tar carries them beside the bootstrap; with them in the cache a daemon does not
    have to fetch blob metadata from the registry.
    """
    cache.mkdir(parents=True, exist_ok=True)
    for folder in dict.fromkeys((image.bootstrap.parent, snapshot_dir / "fs")):
        for meta in folder.glob("*.blob.meta"):
            target = cache / meta.name
            if not target.exists():
                tmp = cache / f".{meta.name}.tmp"
                shutil.copyfile(meta, tmp)
                os.replace(tmp, target)


def _warm_api_client(path: Path = Path("/nonexistent/api.sock")) -> None:
    """Build (and drop) one API client at start-up: the first one imports httpcore's lazy
    dependencies (trio among them, about 0.1 s), which would otherwise be paid by the first
    Prepare that waits for a daemon."""
    with contextlib.suppress(Exception):
        NydusdClient(path).close()


class NydusdBackend(Backend):
    """A backend whose daemons are a nydusd-compatible program; subclass it per driver."""

    #: nydusd's subcommand for this driver (``fuse``, ``singleton``, ``virtiofs``).
    subcommand = "fuse"
    #: the API client `wait_ready` hands to `on_running` (a subclass may extend the API).
    client_class: type[NydusdClient] = NydusdClient

    def open(self, ctx: BackendContext, recorded: Sequence[DaemonRecord]) -> None:
        super().open(ctx, recorded)
        self.config: SnapshotterConfig = ctx.config
        self.template = load_template(Path(ctx.config.daemon.nydusd_config))
        threading.Thread(target=_warm_api_client, name="warm-api-client", daemon=True).start()

    # -- per image ----------------------------------------------------------------------------
    def prepare(
        self, instance: Instance, image: ImageSource, labels: Mapping[str, str], daemon: DaemonRecord | None
    ) -> None:
        if daemon is None:
            return  # no daemon (daemon_mode none): nothing reads a config
        copy_blob_meta(image, instance.snapshot_dir, Path(self.config.cache_dir))
        if daemon.mode is DaemonMode.SHARED:
            instance.config_path = daemon.config_dir / image.meta_id / "config.json"
        else:
            instance.config_path = daemon.config_dir / "config.json"
        doc = build_config(
            self.template,
            image_ref=image.image_ref,
            rafs_key=image.meta_id,
            cache_dir=Path(self.config.cache_dir),
            labels=labels,
            hooks=self.ctx.hooks,
            remote=self.config.remote,
        )
        write_private_json(instance.config_path, doc)

    def attach(self, daemon: DaemonRecord | None, instance: Instance) -> None:
        if daemon is None or daemon.mode is not DaemonMode.SHARED:
            return  # a dedicated daemon mounts its image when it starts
        if instance.config_path is None:
            raise ValueError(f"instance of snapshot {instance.snapshot_id} has no daemon config file")
        try:
            with NydusdClient(daemon.api_socket) as client:
                client.mount(instance.snapshot_id, instance.bootstrap, instance.config_path.read_text())
        except BaseException:
            shutil.rmtree(instance.config_path.parent, ignore_errors=True)
            raise

    def detach(self, daemon: DaemonRecord | None, instance: Instance) -> None:
        if daemon is None or daemon.mode is not DaemonMode.SHARED:
            return
        try:
            with NydusdClient(daemon.api_socket) as client:
                client.umount(instance.snapshot_id)
        except NydusdApiError as e:
            if e.status != 404:
                raise
            log.info("snapshot %s was not mounted in daemon %s", instance.snapshot_id, daemon.id)
        umount_tree(instance.mountpoint)
        if instance.config_path is not None:
            shutil.rmtree(instance.config_path.parent, ignore_errors=True)

    # -- the process --------------------------------------------------------------------------
    def command_line(self, daemon: DaemonRecord, instance: Instance | None) -> list[str]:
        """Upstream's nydusd argv (flags in upstream's order, zero values left out), then
        `extra_args`."""
        program = shutil.which(daemon.program) if daemon.program else None
        if program is None:
            raise FailedPrecondition(
                f"nydusd program {daemon.program!r} not found (set [daemon] nydusd_path or --nydusd-path)"
            )
        argv = [program, self.subcommand]
        if daemon.thread_num > 0:
            argv += ["--thread-num", str(daemon.thread_num)]
        if daemon.mode is DaemonMode.DEDICATED:
            if instance is None or instance.config_path is None:
                raise ValueError(f"dedicated daemon {daemon.id} needs an instance with a config file")
            argv += ["--config", str(instance.config_path), "--bootstrap", str(instance.bootstrap)]
        argv += ["--mountpoint", str(daemon.mountpoint), "--apisock", str(daemon.api_socket)]
        argv += ["--log-level", daemon.log_level or "info"]
        if self.config.daemon.log_rotation_size > 0:
            argv += ["--log-rotation-size", str(self.config.daemon.log_rotation_size)]
        if not self.config.log.log_to_stdout:
            argv += ["--log-file", str(daemon.log_dir / "nydusd.log")]
        return argv + self.extra_args(daemon)

    def extra_args(self, daemon: DaemonRecord) -> list[str]:
        """Arguments a subclass appends to upstream's command line."""
        return []

    def spawn(
        self,
        daemon: DaemonRecord,
        instance: Instance | None,
        extra: Sequence[str] = (),
        *,
        spare: bool = False,
    ) -> int:
        """Start the program for `daemon` (its socket cleared, its dirs made); the pid.

        :param spare: a process started ahead of need may become it (`take_spare`).
        """
        argv = self.command_line(daemon, instance) + list(extra)
        daemon.api_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        daemon.api_socket.unlink(missing_ok=True)
        if not is_mounted(daemon.mountpoint):
            # Never stat a live mount: after a death nobody may answer on it until the process
            # spawned here serves it (mkdir(exist_ok) stats an existing path).
            daemon.mountpoint.mkdir(parents=True, exist_ok=True)
        daemon.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = None if self.config.log.log_to_stdout else daemon.log_dir / "nydusd.out"
        if spare:
            pid = self.take_spare(argv, log_file)
            if pid is not None:
                return pid
        return process.spawn(argv, log_file, what=f"daemon {daemon.id}")

    def take_spare(self, argv: Sequence[str], log_file: Path | None) -> int | None:
        """A process already started that becomes the one of `argv` (its pid), or ``None`` to
        spawn it; this base class keeps none (``plugins/fuse`` does: its spare daemon)."""
        return None

    def start(self, daemon: DaemonRecord, instance: Instance | None) -> int:
        return self.spawn(daemon, instance, spare=True)

    def wait_ready(self, daemon: DaemonRecord, timeout: float, state: str = STATE_RUNNING) -> bool:
        """Wait until ``GET /api/v1/daemon`` reports `state`; `on_running` once it is RUNNING."""
        deadline = time.monotonic() + timeout
        with self.client_class(daemon.api_socket, timeout=max(1.0, min(timeout, 5.0))) as client:
            while True:
                try:
                    info = client.daemon_info()
                    if info.state == state:
                        daemon.version = str(info.version.get("package_ver", "")) or daemon.version
                        if state == STATE_RUNNING:
                            self.on_running(client, daemon)
                        return True
                except NydusdUnreachable:
                    pass
                if process.is_child(daemon.pid) and process.exited(daemon.pid):
                    raise Unavailable(
                        f"daemon {daemon.id} ({daemon.program}, pid {daemon.pid}) exited with status "
                        f"{process.child_status(daemon.pid)} before it was ready; see its log in "
                        f"{daemon.log_dir}"
                    )
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)

    def on_running(self, client: NydusdClient, daemon: DaemonRecord) -> None:
        """The daemon just reported RUNNING (`wait_ready`)."""

    def alive(self, daemon: DaemonRecord) -> bool:
        if daemon.pid > 0 and process.exited(daemon.pid):
            return False  # no need to ask: its process is gone (what the liveness monitor sees first)
        try:
            with NydusdClient(daemon.api_socket, timeout=3.0) as client:
                return client.state() == STATE_RUNNING
        except (NydusdUnreachable, NydusdApiError, OSError):
            return False

    def is_ours(self, pid: int, daemon: DaemonRecord) -> bool:
        """Guard against pid reuse: the process must have been started with the daemon's socket."""
        return process.names(pid, daemon.api_socket)

    def reconcile(self, daemon: DaemonRecord) -> bool:
        """Point ``daemon.pid`` at the process that serves (or will serve) the daemon; kill the rest.

        Several processes name the same API socket only after a recovery was interrupted: each
        spawn unlinks the socket first, so the one bound to it is the latest; the others can no
        longer be reached and would live on as orphans.
        """
        procs = process.processes_naming(daemon.api_socket)
        if not procs:
            return False
        keep = process.serving_pid(daemon.api_socket)
        if keep not in procs:
            keep = daemon.pid if daemon.pid in procs else max(procs, key=process.start_time)
        for pid in procs:
            if pid != keep:
                log.warning("daemon %s: killing stale process %d (not bound to %s)", daemon.id, pid,
                            daemon.api_socket)  # fmt: skip
                process.kill_now(pid, daemon.api_socket)
        changed = keep != daemon.pid
        if changed:
            log.warning("daemon %s: record named pid %d, the process serving it is %d", daemon.id, daemon.pid,
                        keep)  # fmt: skip
            daemon.pid = keep
        return changed

    def terminate(self, daemon: DaemonRecord) -> None:
        process.terminate(daemon.pid, daemon.api_socket, what=f"daemon {daemon.id}")

    def clear_vestige(self, daemon: DaemonRecord) -> None:
        """Remove what a dead daemon leaves: mounts at and under its mountpoint, its socket."""
        umount_tree(daemon.mountpoint)
        daemon.api_socket.unlink(missing_ok=True)

    def stop(self, daemon: DaemonRecord) -> None:
        self.terminate(daemon)
        self.clear_vestige(daemon)

    def recover(self, daemon: DaemonRecord, instances: Sequence[Instance]) -> bool:
        """Upstream's ``restart``: clear the mount, spawn the same command line, re-attach."""
        return self.restart(daemon, instances)

    def restart(self, daemon: DaemonRecord, instances: Sequence[Instance]) -> bool:
        ordered = sorted(instances, key=lambda i: i.seq)
        dedicated = daemon.mode is DaemonMode.DEDICATED
        if dedicated and not ordered:
            log.warning("dedicated daemon %s has no recorded image; not respawning it", daemon.id)
            return False
        self.terminate(daemon)  # a hung process that no longer answers
        self.clear_vestige(daemon)
        daemon.pid = self.spawn(daemon, ordered[0] if dedicated else None)
        if not self.wait_ready(daemon, RECOVER_READY_TIMEOUT):
            return False
        for inst in () if dedicated else ordered:
            self.attach(daemon, inst)
        log.info("daemon %s respawned as pid %d with %d image(s)", daemon.id, daemon.pid, len(ordered))
        return True

    def describe(self, daemon: DaemonRecord) -> dict[str, Any]:
        return {}
