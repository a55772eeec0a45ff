"""The daemon manager: which backend and daemon serve which image, and keeping that true across restarts.

It implements the snapshotter's image service (``ensure_instance`` / ``get_instance`` /
``release_unused``) without knowing how an image is served: every operation goes through the
`nydus_core.records.Backend` of the record named by the image's ``fs_driver`` (the configured
``[daemon] fs_driver``, unless the image's format asks for another backend). The manager owns the
records (``<root>/nydus.db``), the locks, the liveness monitor and the policy; the backend owns
processes, mounts and whatever it keeps beside them.

Modes (``daemon_mode``), for a backend that runs daemons (`Capabilities.daemon`):

* ``dedicated`` (alias ``multiple``): one daemon per meta snapshot, mounted at
  ``<root>/snapshots/<metaID>/mnt``;
* ``shared``: one daemon per backend mounted at ``<root>/mnt``, each image attached at
  ``<root>/mnt/<metaID>``; started when first needed and kept running when its last image goes;
* ``none``: no daemon; the instance points at the meta snapshot's own directory.

A backend without daemons serves every image itself (at ``<root>/snapshots/<metaID>/mnt``
unless its `Backend.prepare` says otherwise), whatever the mode.

Daemons are never stopped when the snapshotter exits (running containers read through them);
`recover` re-adopts them at the next start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.ids import new_daemon_id
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.control.daemons.store import DaemonStore
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.errors import AlreadyExists, ConfigError, FailedPrecondition, InvalidArgument, Unavailable
from nydus_core.plugins import NoBackendError, NydusPluginManager
from nydus_core.records import BackendContext, BackendRecord

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 10.0

_LOG_LEVELS = {"warning": "warn", "fatal": "error", "panic": "error"}

__all__ = ["DaemonManager", "NoBackendError", "UpgradeBusy", "check_program", "daemon_mode"]


class UpgradeBusy(AlreadyExists):
    """A hot upgrade was asked for while another one runs."""


UPGRADE_POLICIES = ("", "rolling")  # upstream names "rolling" (one daemon at a time) as the default


def check_program(program: str) -> str:
    """Why `program` cannot be a daemon program (empty when it can): absolute, a file, executable."""
    if not program:
        return "nydusd_path is required"
    path = Path(program)
    if not path.is_absolute():
        return f"nydusd_path {program!r} is not an absolute path"
    if not path.is_file():
        return f"nydusd_path {program} does not exist or is not a file"
    if not os.access(path, os.X_OK):
        return f"nydusd_path {program} is not executable"
    return ""


def daemon_mode(config: SnapshotterConfig) -> DaemonMode:
    mode = config.daemon_mode
    if mode in ("dedicated", "multiple", ""):
        return DaemonMode.DEDICATED
    if mode == "shared":
        return DaemonMode.SHARED
    if mode == "none":
        return DaemonMode.NONE
    raise FailedPrecondition(f"daemon_mode {mode!r} is not one of dedicated, multiple, shared, none")


class DaemonManager:
    """Owns ``<root>/nydus.db`` and the in-memory map meta snapshot id → `Instance`.

    Call `check_configuration` and `recover` once at start-up, before serving: they make sure
    the configured backend can serve the configured mode, load the records and re-adopt or
    recover the daemons they name.
    """

    def __init__(
        self,
        config: SnapshotterConfig,
        pm: NydusPluginManager,
        *,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
    ) -> None:
        self.config = config
        self.pm = pm
        self.hooks = pm.typed
        self.registry = pm.registry
        self.root = Path(config.root)
        self.mode = daemon_mode(config)
        self.fs_driver = config.daemon.fs_driver
        self.ready_timeout = ready_timeout
        self.store = DaemonStore(self.root / "nydus.db")
        self._lock = threading.Lock()  # guards the dicts below
        self._meta_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._shared_lock = threading.Lock()
        self._recover_lock = threading.Lock()  # one dead daemon is handled by one thread
        self._upgrade_lock = threading.Lock()  # one hot upgrade at a time
        self._open_lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self._daemons: dict[str, DaemonRecord] = {}
        self._instances: dict[str, Instance] = {}
        self._shared: dict[str, DaemonRecord] = {}  # backend name -> its shared daemon
        self._opened: dict[str, BackendRecord] = {}

    def close(self) -> None:
        """Stop the liveness monitor, close the backends and the database. Daemons keep running
        on purpose (and whatever a backend keeps beside them)."""
        self.stop_liveness_monitor()
        for record in list(self._opened.values()):
            try:
                record.backend.close()
            except Exception:
                log.exception("closing backend %s failed", record.name)
        self.store.close()

    # ------------------------------------------------------------------------------------
    # Backends
    # ------------------------------------------------------------------------------------

    def check_configuration(self) -> None:
        """Start-up: the configured backend exists and can serve the configured mode.

        An ``fs_driver`` the file or the flags set that no installed plugin provides raises
        `NoBackendError` (the installed backends and the pip extra in the message); the default
        one missing only warns: plain OCI images are served as ever, and a lazily pulled image is
        answered with that same message.
        """
        record = self.registry.backend(self.fs_driver)
        if record is None:
            if self.config.is_set("daemon.fs_driver"):
                self.registry.require_backend(self.fs_driver, "set by [daemon] fs_driver or --fs-driver")
            try:
                self.registry.require_backend(self.fs_driver, "the default")
            except NoBackendError as e:
                log.warning("%s. Plain OCI images are served; lazily pulled images are refused until the "
                            "backend is installed", e)  # fmt: skip
            return
        caps = record.capabilities
        if not caps.daemon:
            if self.mode is not DaemonMode.NONE and self.config.is_set("daemon_mode"):
                log.warning("backend %s runs no daemons: daemon_mode %r does not apply to it", record.name,
                            self.config.daemon_mode)  # fmt: skip
            return
        if self.mode is DaemonMode.SHARED and not caps.shared_daemon:
            raise ConfigError(f'daemon_mode: backend {record.name} (fs_driver) has no shared daemon, '
                              f'daemon_mode = "shared" cannot be served by it')  # fmt: skip
        if self.mode is DaemonMode.DEDICATED and not caps.dedicated_daemon:
            raise ConfigError(f"daemon_mode: backend {record.name} (fs_driver) has no dedicated daemons; "
                              f'set daemon_mode = "shared"')  # fmt: skip
        if self.config.daemon.recover_policy == "failover" and not caps.failover:
            log.warning('backend %s cannot fail a daemon over: recover_policy = "failover" is served as '
                        '"restart"', record.name)  # fmt: skip

    def backend(self, name: str, why: str = "") -> BackendRecord:
        """The opened backend record `name` (opened on first use); `NoBackendError` when no
        installed plugin provides it."""
        with self._open_lock:
            record = self._opened.get(name)
            if record is not None:
                return record
            record = self.registry.require_backend(name, why)
            recorded = [d for d in self.store.list_daemons() if d.fs_driver == name]
            ctx = BackendContext(
                root=self.root,
                config=self.config,
                hooks=self.hooks,
                daemons=lambda: [d for d in self.daemons() if d.fs_driver == name],
                ready_timeout=self.ready_timeout,
            )
            record.backend.open(ctx, recorded)
            self._opened[name] = record
            log.info("backend %s opened (%d recorded daemon(s))", name, len(recorded))
            return record

    def _owner(self, daemon: DaemonRecord) -> BackendRecord:
        return self.backend(daemon.fs_driver, f"daemon {daemon.id}")

    def describe(self, daemon: DaemonRecord) -> dict[str, Any]:
        """The owning backend's extra fields for the system API."""
        try:
            return dict(self._owner(daemon).backend.describe(daemon))
        except Exception:
            return {}

    # ------------------------------------------------------------------------------------
    # The image service the snapshotter calls
    # ------------------------------------------------------------------------------------

    def get_instance(self, meta_id: str) -> Instance | None:
        with self._lock:
            return self._instances.get(meta_id)

    def instances(self) -> list[Instance]:
        with self._lock:
            return sorted(self._instances.values(), key=lambda i: i.seq)

    def daemons(self) -> list[DaemonRecord]:
        with self._lock:
            return list(self._daemons.values())

    def daemon(self, daemon_id: str) -> DaemonRecord | None:
        with self._lock:
            return self._daemons.get(daemon_id)

    def ensure_instance(self, image: ImageSource, labels: Mapping[str, str]) -> Instance:
        """Make `image` served (start or reuse a daemon, attach) and return its instance, once ready.

        Concurrent calls for one meta snapshot are serialised: the first starts the daemon, the
        others get the same instance.
        """
        meta = image.meta_id
        with self._meta_lock(meta):
            existing = self.get_instance(meta)
            if existing is not None:
                existing = self._revive_if_dead(existing)
            if existing is not None:
                return existing
            name = image.backend or self.fs_driver
            why = f"needed for the {image.format} image of snapshot {meta}"
            record = self.backend(name, why)
            all_labels = {**image.labels, **labels}
            snapshot_dir = self.root / "snapshots" / meta
            mode = self.mode if record.capabilities.daemon else DaemonMode.NONE
            if mode is DaemonMode.NONE:
                inst = self._serve_without_daemon(record, image, all_labels, snapshot_dir)
            elif mode is DaemonMode.DEDICATED:
                inst = self._start_dedicated(record, image, all_labels, snapshot_dir)
            else:
                inst = self._attach_shared(record, image, all_labels, snapshot_dir)
            self.store.add_instance(inst)
            with self._lock:
                self._instances[meta] = inst
            return inst

    def release_unused(self, live_snapshot_ids: set[str]) -> None:
        """Detach every instance whose meta snapshot is gone; stop its daemon when dedicated.

        Failures are logged and the records kept, so that the next ``Cleanup`` retries.
        """
        for inst in self.instances():
            if inst.snapshot_id in live_snapshot_ids:
                continue
            with self._meta_lock(inst.snapshot_id):
                current = self.get_instance(inst.snapshot_id)  # it may have been revived meanwhile
                if current is None:
                    continue
                try:
                    self._release(current)
                except Exception:
                    log.exception("releasing image instance of snapshot %s failed", inst.snapshot_id)

    # ------------------------------------------------------------------------------------
    # Start-up recovery and liveness
    # ------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Load the records; re-adopt live daemons; handle dead ones per ``recover_policy``;
        restore daemon-less instances."""
        instances = self.store.list_instances()
        daemons = self.store.list_daemons()
        known = {d.id for d in daemons}
        for orphan in (i for i in instances if i.daemon_id and i.daemon_id not in known):
            log.warning("dropping the record of snapshot %s: its daemon %r is not recorded",
                        orphan.snapshot_id, orphan.daemon_id)  # fmt: skip
            self.store.delete_instance(orphan.snapshot_id)
        if self.registry.backend(self.fs_driver) is not None:
            self.backend(self.fs_driver, "configured")  # opened now: it reconciles its helpers
        for daemon in daemons:
            served = [i for i in instances if i.daemon_id == daemon.id]
            try:
                record = self._owner(daemon)
            except NoBackendError as e:
                log.error("cannot recover daemon %s (pid %d), its records are kept: %s", daemon.id,
                          daemon.pid, e)  # fmt: skip
                continue
            if daemon.mode is DaemonMode.DEDICATED and not served:
                # the snapshotter died between starting it and recording its image: nothing
                # refers to its mount (the Prepare never returned; containerd asks again)
                log.warning("dedicated daemon %s serves no recorded image: stopping it", daemon.id)
                self._forget(daemon)
                continue
            if record.backend.reconcile(daemon):
                # a snapshotter died mid-recovery: the record now names the process that
                # serves, or will serve, in place of the dead one
                log.warning("daemon %s: adopted pid %d left by an interrupted recovery", daemon.id,
                            daemon.pid)  # fmt: skip
                self.store.save_daemon(daemon)
            if record.backend.alive(daemon):
                log.info("daemon %s (pid %d) is alive, re-adopted with %d image(s)", daemon.id, daemon.pid,
                         len(served))  # fmt: skip
                self._adopt(daemon, served)
                try:
                    record.backend.adopt(daemon)
                except Exception:
                    log.exception("backend %s failed to adopt daemon %s", record.name, daemon.id)
            else:
                self._handle_dead(daemon, served, reason="found dead at start-up")
        for inst in (i for i in instances if not i.daemon_id):
            self._restore(inst)

    def _restore(self, inst: Instance) -> None:
        try:
            record = self.backend(inst.fs_driver, f"image of snapshot {inst.snapshot_id}")
        except NoBackendError as e:
            log.error("cannot restore the image of snapshot %s, its record is kept: %s", inst.snapshot_id, e)
            return
        try:
            ok = record.backend.restore(inst)
        except Exception:
            log.exception("backend %s failed to restore the image of snapshot %s", record.name,
                          inst.snapshot_id)  # fmt: skip
            ok = False
        if ok:
            with self._lock:
                self._instances[inst.snapshot_id] = inst
        else:
            log.warning("image of snapshot %s could not be restored: forgetting it", inst.snapshot_id)
            self.store.delete_instance(inst.snapshot_id)

    def check_liveness(self) -> list[str]:
        """One sweep of the liveness check; dead daemons are handled per policy. Returns their ids."""
        for record in list(self._opened.values()):
            try:
                record.backend.sweep()
            except Exception:
                log.exception("liveness sweep of backend %s failed", record.name)
        dead = []
        for daemon in self.daemons():
            if not self._alive(daemon) and self._recover_dead(daemon, reason="liveness check failed"):
                dead.append(daemon.id)
        return dead

    def start_liveness_monitor(self, interval: float = 5.0) -> None:
        """Run `check_liveness` every `interval` seconds in a background thread until `close`.

        Deaths are noticed sooner: the thread also waits on a pidfd of every daemon process (and
        of every process a backend asks to be watched), so a killed daemon is checked at once
        (what upstream gets from EPOLLHUP on the API socket); the interval still catches hung
        daemons and the daemon set is re-read every 0.2 s.

        Opt-in: whoever owns the process lifecycle starts it, so that a test or tool that only
        inspects records never respawns daemons behind its back.
        """
        if self._monitor is not None:
            return
        self._monitor_stop.clear()

        def run() -> None:
            next_sweep = time.monotonic() + interval
            while not self._monitor_stop.is_set():
                died = self._wait_for_death(min(0.2, max(0.0, next_sweep - time.monotonic())))
                if self._monitor_stop.is_set():
                    return
                if not died and time.monotonic() < next_sweep:
                    continue
                next_sweep = time.monotonic() + interval
                try:
                    self.check_liveness()
                except Exception:
                    log.exception("liveness check failed")

        self._monitor = threading.Thread(target=run, name="nydus-daemon-liveness", daemon=True)
        self._monitor.start()

    def _wait_for_death(self, timeout: float) -> bool:
        """Wait up to `timeout` for any daemon process (or a watched helper) to exit; True if one did."""
        fds: list[int] = []
        try:
            pids = [d.pid for d in self.daemons()]
            for record in list(self._opened.values()):
                with contextlib.suppress(Exception):
                    pids += record.backend.watch_pids()
            for pid in pids:
                if pid > 0:
                    with contextlib.suppress(OSError):
                        fds.append(os.pidfd_open(pid))
            if not fds:
                self._monitor_stop.wait(timeout)
                return False
            ready, _, _ = select.select(fds, [], [], timeout)
            return bool(ready)
        finally:
            for fd in fds:
                os.close(fd)

    def stop_liveness_monitor(self) -> None:
        if self._monitor is None:
            return
        self._monitor_stop.set()
        self._monitor.join()
        self._monitor = None

    def _alive(self, daemon: DaemonRecord) -> bool:
        return bool(self._owner(daemon).backend.alive(daemon))

    def _revive_if_dead(self, inst: Instance) -> Instance | None:
        """The instance if its daemon serves (after recovering it if need be), else ``None``."""
        daemon = self.daemon(inst.daemon_id)
        if daemon is None or self._alive(daemon):
            return inst
        self._recover_dead(daemon, reason=f"not serving when snapshot {inst.snapshot_id} was needed")
        return self.get_instance(inst.snapshot_id)

    def _recover_dead(self, daemon: DaemonRecord, *, reason: str) -> bool:
        """Handle one daemon found dead; False when another thread had already dealt with it."""
        shared = daemon.mode is DaemonMode.SHARED
        # While a shared daemon is recovered nobody may start a second one on its mountpoint.
        with self._recover_lock, self._shared_lock if shared else contextlib.nullcontext():
            with self._lock:
                if self._daemons.get(daemon.id) is not daemon:
                    return False  # forgotten or replaced meanwhile
            if self._alive(daemon):
                return False  # recovered by another thread meanwhile
            with self._lock:
                served = sorted(
                    (i for i in self._instances.values() if i.daemon_id == daemon.id), key=lambda i: i.seq
                )
                self._daemons.pop(daemon.id, None)
                for i in served:
                    self._instances.pop(i.snapshot_id, None)
                if self._shared.get(daemon.fs_driver) is daemon:
                    self._shared.pop(daemon.fs_driver, None)
            self._handle_dead(daemon, served, reason=reason)
            return True

    def _handle_dead(self, daemon: DaemonRecord, served: Sequence[Instance], *, reason: str) -> None:
        self._event(daemon, "died", {"pid": daemon.pid, "reason": reason})
        policy = self.config.daemon.recover_policy
        if policy == "none":
            log.warning("daemon %s is dead and recover_policy is 'none': forgetting it and its %d image(s)",
                        daemon.id, len(served))  # fmt: skip
            self._forget(daemon)
            return
        try:
            ok = self._owner(daemon).backend.recover(daemon, list(served))
        except Exception as e:
            log.exception("recovering daemon %s failed", daemon.id)
            ok, err = False, str(e)
        else:
            err = "" if ok else "the backend gave it up"
        if ok:
            self.store.save_daemon(daemon)
            self._adopt(daemon, served)
            self._event(daemon, "recovered", {"pid": daemon.pid, "instances": len(served)})
            return
        log.error("daemon %s could not be recovered (%s); forgetting it", daemon.id, err)
        self._forget(daemon)

    # ------------------------------------------------------------------------------------
    # Hot upgrade
    # ------------------------------------------------------------------------------------

    def upgrade(self, program: str, version: str = "", policy: str = "") -> list[dict[str, Any]]:
        """Move every daemon onto `program` without unmounting (``PUT /api/v1/daemons/upgrade``).

        One daemon at a time, each under the locks its recovery, attach and release take, through
        its backend's `upgrade`; the first failure stops the run (upstream aborts too) and is
        raised with what was upgraded so far. New daemons keep using ``[daemon] nydusd_path``;
        upgraded ones keep `program` in their record, so their later recoveries (also after a
        snapshotter restart) run it.

        :raises InvalidArgument: `program` is not an absolute path to an executable file, or
            `policy` is not ``""``/``"rolling"``.
        :raises FailedPrecondition: a backend cannot upgrade now (its `check_upgrade` says why).
        :raises UpgradeBusy: another upgrade runs.
        :return: one entry per upgraded daemon (id, pids, programs, versions, API socket).
        """
        problem = check_program(program)
        if problem:
            raise InvalidArgument(problem)
        if policy not in UPGRADE_POLICIES:
            raise InvalidArgument(f"upgrade policy {policy!r} is not supported (only {UPGRADE_POLICIES})")
        drivers = sorted({d.fs_driver for d in self.daemons()} | {self.fs_driver})
        for name in drivers:
            record = self.backend(name, "hot upgrade")
            if not record.capabilities.hot_upgrade:
                raise FailedPrecondition(f"backend {name} cannot hot-upgrade its daemons")
            record.backend.check_upgrade()
        if not self._upgrade_lock.acquire(blocking=False):
            raise UpgradeBusy("another daemon upgrade is running")
        try:
            done: list[dict[str, Any]] = []
            for daemon in sorted(self.daemons(), key=lambda d: d.id):
                try:
                    result = self._upgrade_one(daemon, program, version)
                except Exception as e:
                    if done:
                        ids = ", ".join(d["id"] for d in done)
                        raise type(e)(f"{e} (already upgraded: {ids})") from e
                    raise
                if result is not None:
                    done.append(result)
            return done
        finally:
            self._upgrade_lock.release()

    def _upgrade_one(self, daemon: DaemonRecord, program: str, version: str) -> dict[str, Any] | None:
        shared = daemon.mode is DaemonMode.SHARED
        record = self._owner(daemon)
        with self._lock:
            metas = sorted(i.snapshot_id for i in self._instances.values() if i.daemon_id == daemon.id)
        with contextlib.ExitStack() as locks:
            for meta in metas:  # release_unused and ensure_instance of its images wait
                locks.enter_context(self._meta_lock(meta))
            locks.enter_context(self._recover_lock)  # the liveness monitor waits
            if shared:
                locks.enter_context(self._shared_lock)  # attach/detach wait
            with self._lock:
                if self._daemons.get(daemon.id) is not daemon:
                    return None  # released or replaced meanwhile
                served = sorted((i for i in self._instances.values() if i.daemon_id == daemon.id),
                                key=lambda i: i.seq)  # fmt: skip
            if not record.backend.alive(daemon):
                raise Unavailable(f"daemon {daemon.id} (pid {daemon.pid}) is not serving; not upgrading it")
            before = {"pid": daemon.pid, "program": daemon.program, "version": daemon.version}
            try:
                record.backend.upgrade(daemon, served, program, version)
            finally:
                self.store.save_daemon(daemon)  # a fail-back may have changed the pid
        detail = {
            "id": daemon.id,
            "old_pid": before["pid"],
            "pid": daemon.pid,
            "old_program": before["program"],
            "program": daemon.program,
            "old_version": before["version"],
            "version": daemon.version,
            "api_socket": str(daemon.api_socket),
        }
        self._event(daemon, "upgraded", detail)
        return detail

    # ------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------

    def _adopt(self, daemon: DaemonRecord, served: Sequence[Instance]) -> None:
        with self._lock:
            self._daemons[daemon.id] = daemon
            for inst in served:
                self._instances[inst.snapshot_id] = inst
            if daemon.mode is DaemonMode.SHARED:
                self._shared[daemon.fs_driver] = daemon

    def _forget(self, daemon: DaemonRecord) -> None:
        """Clear what a dead daemon left (its backend's stop: no process, stale mounts) and drop
        its records."""
        try:
            self._owner(daemon).backend.stop(daemon)
        except Exception:
            log.exception("clearing the remains of daemon %s failed", daemon.id)
        self.store.delete_daemon(daemon.id)
        self._remove_daemon_dirs(daemon)
        self._event(daemon, "stopped", {"pid": daemon.pid, "forgotten": True})

    def _meta_lock(self, meta_id: str) -> threading.Lock:
        with self._lock:
            return self._meta_locks[meta_id]

    def _new_record(self, record: BackendRecord, mode: DaemonMode, mountpoint: Path) -> DaemonRecord:
        did = new_daemon_id()
        level = self.config.log.level.lower()
        return DaemonRecord(
            id=did,
            fs_driver=record.name,
            mode=mode,
            api_socket=self.root / "socket" / did / "api.sock",
            mountpoint=mountpoint,
            config_dir=self.root / "config" / did,
            log_dir=Path(self.config.log_dir) / did,
            program=self.config.daemon.nydusd_path,
            thread_num=self.config.daemon.threads_number,
            log_level=_LOG_LEVELS.get(level, level),
            failover_policy=self.config.daemon.failover_policy,
        )

    def _new_instance(
        self, record: BackendRecord, image: ImageSource, snapshot_dir: Path, daemon: DaemonRecord | None,
        mountpoint: Path,
    ) -> Instance:  # fmt: skip
        return Instance(
            snapshot_id=image.meta_id,
            daemon_id="" if daemon is None else daemon.id,
            image_ref=image.image_ref,
            bootstrap=image.bootstrap,
            mountpoint=mountpoint,
            snapshot_dir=snapshot_dir,
            fs_driver=record.name,
        )

    def _serve_without_daemon(
        self, record: BackendRecord, image: ImageSource, labels: Mapping[str, str], snapshot_dir: Path
    ) -> Instance:
        # daemon_mode "none" with a daemon backend: nothing is mounted, the instance is the meta
        # snapshot's own directory (Kata and guest pull read it from there). A backend without
        # daemons mounts the image itself.
        mountpoint = snapshot_dir / ("mnt" if not record.capabilities.daemon else "fs")
        inst = self._new_instance(record, image, snapshot_dir, None, mountpoint)
        record.backend.prepare(inst, image, labels, None)
        record.backend.attach(None, inst)
        return inst

    def _start_dedicated(
        self, record: BackendRecord, image: ImageSource, labels: Mapping[str, str], snapshot_dir: Path
    ) -> Instance:
        daemon = self._new_record(record, DaemonMode.DEDICATED, snapshot_dir / "mnt")
        inst = self._new_instance(record, image, snapshot_dir, daemon, daemon.mountpoint)
        try:
            record.backend.prepare(inst, image, labels, daemon)
        except BaseException:
            shutil.rmtree(daemon.config_dir, ignore_errors=True)
            raise
        self._launch(record, daemon, inst)
        try:
            record.backend.attach(daemon, inst)  # the image came with the start: ready already
        except BaseException:
            self._discard(record, daemon)
            raise
        with self._lock:
            self._daemons[daemon.id] = daemon
        return inst

    def _launch(self, record: BackendRecord, daemon: DaemonRecord, inst: Instance | None) -> None:
        """Record a new daemon, start it and wait until it serves; forget it again if that fails."""
        self.store.save_daemon(daemon)
        try:
            daemon.pid = int(record.backend.start(daemon, inst))
            self.store.save_daemon(daemon)
            self._event(daemon, "started", {"pid": daemon.pid})
            self._wait_ready(record, daemon)
        except BaseException:
            self._discard(record, daemon)
            raise

    def _ensure_shared(self, record: BackendRecord) -> DaemonRecord:
        with self._shared_lock:
            current = self._shared.get(record.name)
            if current is not None:
                return current
            daemon = self._new_record(record, DaemonMode.SHARED, self.root / "mnt")
            self._launch(record, daemon, None)
            with self._lock:
                self._daemons[daemon.id] = daemon
                self._shared[record.name] = daemon
            return daemon

    def _attach_shared(
        self, record: BackendRecord, image: ImageSource, labels: Mapping[str, str], snapshot_dir: Path
    ) -> Instance:
        with self._lock:
            current = self._shared.get(record.name)
        if current is not None and not self._alive(current):
            self._recover_dead(current, reason=f"not serving when snapshot {image.meta_id} was attached")
        daemon = self._ensure_shared(record)
        inst = self._new_instance(record, image, snapshot_dir, daemon, daemon.mountpoint / image.meta_id)
        record.backend.prepare(inst, image, labels, daemon)
        with self._shared_lock:  # a hot upgrade swaps the shared daemon's process under it
            record.backend.attach(daemon, inst)
        self._wait_ready(record, daemon)
        return inst

    def _release(self, inst: Instance) -> None:
        with self._lock:
            daemon = self._daemons.get(inst.daemon_id)
        record = self.backend(inst.fs_driver, f"image of snapshot {inst.snapshot_id}")
        if daemon is None:  # no daemon, or the daemon was forgotten already
            if not inst.daemon_id:
                record.backend.detach(None, inst)
            self._drop_instance(inst)
            return
        if daemon.mode is DaemonMode.SHARED:
            with self._shared_lock:  # not while a hot upgrade swaps its process
                record.backend.detach(daemon, inst)
            self._drop_instance(inst)
            return
        record.backend.detach(daemon, inst)
        # Under the recover lock: the liveness monitor must not take the stop for a death and
        # recover the daemon while it is being stopped (it finds it forgotten afterwards).
        with self._recover_lock:
            record.backend.stop(daemon)
            with self._lock:
                self._daemons.pop(daemon.id, None)
        self._event(daemon, "stopped", {"pid": daemon.pid})
        self._drop_instance(inst)
        self.store.delete_daemon(daemon.id)
        self._remove_daemon_dirs(daemon)

    def _drop_instance(self, inst: Instance) -> None:
        self.store.delete_instance(inst.snapshot_id)
        with self._lock:
            self._instances.pop(inst.snapshot_id, None)

    def _discard(self, record: BackendRecord, daemon: DaemonRecord) -> None:
        """Undo a daemon whose start failed: stop whatever runs, drop its records and files."""
        try:
            record.backend.stop(daemon)
        except Exception:
            log.exception("stopping the failed daemon %s", daemon.id)
        self.store.delete_daemon(daemon.id)
        self._remove_daemon_dirs(daemon, keep_logs=True)

    def _remove_daemon_dirs(self, daemon: DaemonRecord, *, keep_logs: bool = False) -> None:
        shutil.rmtree(daemon.config_dir, ignore_errors=True)
        shutil.rmtree(daemon.api_socket.parent, ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(daemon.log_dir, ignore_errors=True)

    def _wait_ready(self, record: BackendRecord, daemon: DaemonRecord) -> None:
        if not record.backend.wait_ready(daemon, self.ready_timeout):
            raise Unavailable(
                f"daemon {daemon.id} (pid {daemon.pid}, {daemon.program}) did not become ready within "
                f"{self.ready_timeout:g}s; see its log in {daemon.log_dir}"
            )
        self.store.save_daemon(daemon)  # the backend may have learnt the daemon's version
        self._event(daemon, "ready", {"pid": daemon.pid})

    def _event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        """Tell the owning backend, then broadcast; a listener's failure is logged."""
        try:
            self._owner(daemon).backend.daemon_event(daemon, event, dict(detail))
        except Exception:
            log.exception("backend %s failed on %s of daemon %s", daemon.fs_driver, event, daemon.id)
        try:
            self.hooks.daemon_event(daemon=daemon, event=event, detail=dict(detail))
        except Exception:
            log.exception("a nydus_daemon_event listener failed on %s of daemon %s", event, daemon.id)

