"""The daemon manager: which daemon serves which image, and keeping that true across restarts.

It implements the snapshotter's image service (``ensure_instance`` / ``get_instance`` /
``release_unused``) without knowing how a daemon is run: every process operation goes through
the lifecycle hooks (`nydus_daemon_start`, `nydus_daemon_wait_ready`, `nydus_instance_attach`,
`nydus_instance_detach`, `nydus_daemon_alive`, `nydus_daemon_stop`, `nydus_daemon_recover`), so a
backend plugin (FUSE, EROFS, virtiofs, ...) only answers for its own ``fs_driver``.

Modes (``daemon_mode``):

* ``dedicated`` (alias ``multiple``): one daemon per meta snapshot, mounted at
  ``<root>/snapshots/<metaID>/mnt``;
* ``shared``: one daemon mounted at ``<root>/mnt``, each image attached at ``<root>/mnt/<metaID>``;
  it is started when first needed and kept running when its last image goes;
* ``none``: no daemon; the instance points at the meta snapshot's own directory.

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
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy

from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.holder_client import HolderError, SessionHolder
from nydus_core.control.daemons.ids import new_daemon_id
from nydus_core.control.daemons.image_config import build_config, load_template, write_private_json
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.control.daemons.store import DaemonStore
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from nydus_core.faults import crash_point

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 10.0
# Crash-loop breaker of `failover` (defaults of the manager's parameters): more deaths than this
# within the window and the manager stops taking the session over (it forgets the daemon as under
# `none`). The per-request breaker is in the daemon (a request in flight at too many deaths is
# answered EIO); this one bounds the rest. Only deaths in a row count: a replacement that stayed
# up `FAILOVER_SETTLE` seconds was serving (a crash loop dies on the resent request or while it
# starts, within milliseconds), so its death starts a new count. Without that, an operator's
# kill -9 now and then -- or twenty in a row, each after the failover finished, as issue 5's
# container test does -- would end in giving the mount up: ENOTCONN in every container on it.
FAILOVER_MAX_DEATHS = 10
FAILOVER_WINDOW = 60.0
FAILOVER_SETTLE = 0.5

_LOG_LEVELS = {"warning": "warn", "fatal": "error", "panic": "error"}


class NoBackendError(FailedPrecondition):
    """No installed plugin answers a lifecycle hook for the configured ``fs_driver``."""


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

    Call `recover` once at start-up, before serving: it loads the records and re-adopts or
    respawns the daemons they name.
    """

    def __init__(
        self,
        config: SnapshotterConfig,
        pm: pluggy.PluginManager,
        *,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        failover_max_deaths: int = FAILOVER_MAX_DEATHS,
        failover_window: float = FAILOVER_WINDOW,
        failover_settle: float = FAILOVER_SETTLE,
    ) -> None:
        """:param failover_max_deaths: under ``failover``, a daemon that dies more often than this
            within `failover_window` seconds is given up (crash-loop breaker).
        :param failover_settle: a replacement that lived this long before dying had settled: its
            death starts a new count."""
        self.config = config
        self.pm = pm
        self.root = Path(config.root)
        self.mode = daemon_mode(config)
        self.fs_driver = config.daemon.fs_driver
        self.ready_timeout = ready_timeout
        self.template = load_template(Path(config.daemon.nydusd_config))
        self.store = DaemonStore(self.root / "nydus.db")
        self._lock = threading.Lock()  # guards the dicts below
        self._meta_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._shared_lock = threading.Lock()
        self._recover_lock = threading.Lock()  # one dead daemon is handled by one thread
        self._upgrade_lock = threading.Lock()  # one hot upgrade at a time
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()
        self._daemons: dict[str, DaemonRecord] = {}
        self._instances: dict[str, Instance] = {}
        self._shared: DaemonRecord | None = None
        self.failover_max_deaths = failover_max_deaths
        self.failover_window = failover_window
        self.failover_settle = failover_settle
        self._recovered_at: dict[str, float] = {}  # daemon id -> when its last replacement took over
        self._deaths: defaultdict[str, deque[float]] = defaultdict(deque)
        # `failover`: the session holder (its own process, see holder.py) keeps each daemon's FUSE
        # session (fd + state) across daemon deaths and across snapshotter restarts
        self.session_holder = (
            SessionHolder(self.root, log_file=Path(config.log_dir) / "session-holder.log")
            if config.daemon.recover_policy == "failover"
            else None
        )

    def close(self) -> None:
        """Stop the liveness monitor and close the database. Daemons keep running on purpose,
        and so does the session holder: a daemon that dies while no snapshotter runs keeps its
        mount, and the next start-up fails it over."""
        self.stop_liveness_monitor()
        if self.session_holder is not None:
            self.session_holder.close()
        self.store.close()

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
        """Make `image` served (start or reuse a daemon) and return its instance, once ready.

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
            all_labels = {**image.labels, **labels}
            snapshot_dir = self.root / "snapshots" / meta
            if self.mode is not DaemonMode.NONE:
                self._prepare_cache(image)
            if self.mode is DaemonMode.NONE:
                inst = Instance(
                    snapshot_id=meta,
                    daemon_id="",
                    image_ref=image.image_ref,
                    bootstrap=image.bootstrap,
                    mountpoint=snapshot_dir / "fs",
                    snapshot_dir=snapshot_dir,
                    fs_driver=self.fs_driver,
                )
            elif self.mode is DaemonMode.DEDICATED:
                inst = self._start_dedicated(image, all_labels, snapshot_dir)
            else:
                inst = self._attach_shared(image, all_labels, snapshot_dir)
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
        """Load the records; re-adopt live daemons; handle dead ones per ``recover_policy``."""
        if self.mode is DaemonMode.NONE:
            for inst in self.store.list_instances(""):
                with self._lock:
                    self._instances[inst.snapshot_id] = inst
            return
        instances = self.store.list_instances()
        daemons = self.store.list_daemons()
        known = {d.id for d in daemons}
        for orphan in (i for i in instances if i.daemon_id not in known):
            log.warning("dropping the record of snapshot %s: its daemon %r is not recorded",
                        orphan.snapshot_id, orphan.daemon_id)
            self.store.delete_instance(orphan.snapshot_id)
        self._reconcile_holder(daemons)
        for daemon in daemons:
            served = [i for i in instances if i.daemon_id == daemon.id]
            if daemon.mode is DaemonMode.DEDICATED and not served:
                # the snapshotter died between starting it and recording its image: nothing
                # refers to its mount (the Prepare never returned; containerd asks again)
                log.warning("dedicated daemon %s serves no recorded image: stopping it", daemon.id)
                self._forget(daemon)
                continue
            if self.pm.hook.nydus_daemon_reconcile(daemon=daemon):
                # a snapshotter died mid-failover (or mid-restart): the record now names the
                # process that serves, or will serve, in place of the dead one
                log.warning("daemon %s: adopted pid %d left by an interrupted recovery", daemon.id,
                            daemon.pid)
                self.store.save_daemon(daemon)
            try:
                alive = self._hook_alive(daemon)
            except NoBackendError as e:
                log.error("cannot recover daemon %s: %s", daemon.id, e)
                continue
            if alive:
                log.info("daemon %s (pid %d) is alive, re-adopted with %d image(s)", daemon.id, daemon.pid,
                         len(served))
                self._resupervise(daemon)
                self._adopt(daemon, served)
            else:
                self._handle_dead(daemon, served, reason="found dead at start-up")

    def _reconcile_holder(self, daemons: Sequence[DaemonRecord]) -> None:
        """Start-up: make the session holder agree with the records.

        Under ``failover`` the holder is started if none answers, and sessions it keeps for
        daemons that are not recorded (a snapshotter killed between forgetting a daemon and
        telling the holder) are dropped after their mount is cleared. Under another policy an
        idle holder left from an earlier ``failover`` configuration is told to exit.
        """
        if self.session_holder is None:
            with contextlib.suppress(HolderError):
                SessionHolder(self.root).shutdown()  # refused (and kept) while it holds a session
            return
        self.session_holder.ensure_running()
        known = {d.id for d in daemons}
        for daemon_id, info in self.session_holder.status().items():
            if daemon_id in known:
                continue
            mnt = Path(str(info.get("mountpoint") or ""))
            if info.get("has_session") and mnt.is_absolute() and self.root in mnt.parents:
                log.warning("session holder keeps the session of unrecorded daemon %s: unmounting %s",
                            daemon_id, mnt)
                umount_tree(mnt)
            self.session_holder.remove(daemon_id)

    def _check_holder(self) -> None:
        """The holder died (it should not): start a new one and have every live daemon send its
        session again, so that the next daemon death can still be failed over."""
        if self.session_holder is None or self.session_holder.pid() is not None:
            return
        log.error("the session holder of %s is gone: restarting it; live daemons re-send their sessions",
                  self.root)
        self.session_holder.ensure_running()
        for daemon in self.daemons():
            self._resupervise(daemon)

    def check_liveness(self) -> list[str]:
        """One sweep of the liveness check; dead daemons are handled per policy. Returns their ids."""
        try:
            self._check_holder()
        except HolderError:
            log.exception("cannot restart the session holder")
            if self.session_holder is not None:
                self.session_holder.known_pid = 0  # no busy loop on its pidfd: the sweeps retry
        dead = []
        for daemon in self.daemons():
            if not self._hook_alive(daemon) and self._recover_dead(daemon, reason="liveness check failed"):
                dead.append(daemon.id)
        return dead

    def start_liveness_monitor(self, interval: float = 5.0) -> None:
        """Run `check_liveness` every `interval` seconds in a background thread until `close`.

        Deaths are noticed sooner: the thread also waits on a pidfd of every daemon process, so a
        killed daemon is checked at once (what upstream gets from EPOLLHUP on the API socket);
        the interval still catches hung daemons and the daemon set is re-read every 0.2 s.

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
        """Wait up to `timeout` for any daemon process (or the session holder) to exit; True if
        one did."""
        fds: list[int] = []
        try:
            pids = [d.pid for d in self.daemons()]
            if self.session_holder is not None and self.session_holder.known_pid:
                pids.append(self.session_holder.known_pid)  # a dead holder is replaced at once
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

    def _revive_if_dead(self, inst: Instance) -> Instance | None:
        """The instance if its daemon serves (after recovering it if need be), else ``None``."""
        daemon = self.daemon(inst.daemon_id)
        if daemon is None or self._hook_alive(daemon):
            return inst
        self._recover_dead(daemon, reason=f"not serving when snapshot {inst.snapshot_id} was needed")
        return self.get_instance(inst.snapshot_id)

    def _recover_dead(self, daemon: DaemonRecord, *, reason: str) -> bool:
        """Handle one daemon found dead; False when another thread had already dealt with it."""
        shared = daemon.mode is DaemonMode.SHARED
        # While the shared daemon is recovered nobody may start a second one on its mountpoint.
        with self._recover_lock, self._shared_lock if shared else contextlib.nullcontext():
            with self._lock:
                if self._daemons.get(daemon.id) is not daemon:
                    return False  # forgotten or replaced meanwhile
            if self._hook_alive(daemon):
                return False  # recovered by another thread meanwhile
            with self._lock:
                served = sorted(
                    (i for i in self._instances.values() if i.daemon_id == daemon.id), key=lambda i: i.seq
                )
                self._daemons.pop(daemon.id, None)
                for i in served:
                    self._instances.pop(i.snapshot_id, None)
                if self._shared is daemon:
                    self._shared = None
            self._handle_dead(daemon, served, reason=reason)
            return True

    # ------------------------------------------------------------------------------------
    # Hot upgrade
    # ------------------------------------------------------------------------------------

    def upgrade(self, program: str, version: str = "", policy: str = "") -> list[dict[str, Any]]:
        """Move every daemon onto `program` without unmounting (``PUT /api/v1/daemons/upgrade``).

        One daemon at a time, each under the locks its recovery, attach and release take, through
        the `nydus_daemon_upgrade` hook; the first failure stops the run (upstream aborts too)
        and is raised with what was upgraded so far. New daemons keep using ``[daemon]
        nydusd_path``; upgraded ones keep `program` in their record, so their later failovers
        and restarts (also after a snapshotter restart) run it.

        :raises InvalidArgument: `program` is not an absolute path to an executable file, or
            `policy` is not ``""``/``"rolling"``.
        :raises FailedPrecondition: ``recover_policy`` is not ``failover``.
        :raises UpgradeBusy: another upgrade runs.
        :return: one entry per upgraded daemon (id, pids, programs, versions, API socket).
        """
        problem = check_program(program)
        if problem:
            raise InvalidArgument(problem)
        if policy not in UPGRADE_POLICIES:
            raise InvalidArgument(f"upgrade policy {policy!r} is not supported (only {UPGRADE_POLICIES})")
        if self.config.daemon.recover_policy != "failover" or self.session_holder is None:
            raise FailedPrecondition(
                f'a hot upgrade needs [daemon] recover_policy = "failover" (a supervisor holding each '
                f"FUSE session); it is {self.config.daemon.recover_policy!r}"
            )
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
            if not self._hook_alive(daemon):
                raise Unavailable(f"daemon {daemon.id} (pid {daemon.pid}) is not serving; not upgrading it")
            before = {"pid": daemon.pid, "program": daemon.program, "version": daemon.version}
            try:
                self._hook("nydus_daemon_upgrade", daemon=daemon, instances=served, program=program,
                           version=version, config=self.config)  # fmt: skip
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

    def _adopt(self, daemon: DaemonRecord, served: Sequence[Instance]) -> None:
        with self._lock:
            self._daemons[daemon.id] = daemon
            for inst in served:
                self._instances[inst.snapshot_id] = inst
            if daemon.mode is DaemonMode.SHARED:
                self._shared = daemon

    def _handle_dead(self, daemon: DaemonRecord, served: Sequence[Instance], *, reason: str) -> None:
        self._event(daemon, "died", {"pid": daemon.pid, "reason": reason})
        crash_point("failover-noticed")
        policy = self.config.daemon.recover_policy
        if policy == "failover":
            held = False
            if self.session_holder is not None:
                try:
                    held = self.session_holder.holds(daemon.id)
                    self.session_holder.ensure(daemon.id)  # (re)starts a holder that went away
                except HolderError as e:
                    log.error("daemon %s: %s", daemon.id, e)
            if not held:
                log.warning("daemon %s has no supervised session to take over; restarting it", daemon.id)
                policy = "restart"
            elif (n := self.note_death(daemon.id)) > self.failover_max_deaths:
                log.error("daemon %s died %d times within %gs (limit %d): crash loop, giving failover up "
                          "and forgetting it", daemon.id, n, self.failover_window, self.failover_max_deaths)
                policy = "none"
        if policy in ("restart", "failover"):
            try:
                ok = self._hook("nydus_daemon_recover", daemon=daemon, instances=list(served),
                                config=self.config)
            except Exception as e:
                log.exception("recovering daemon %s failed", daemon.id)
                ok, err = False, str(e)
            else:
                err = "" if ok else "the backend gave it up"
            if ok:
                with self._lock:
                    self._recovered_at[daemon.id] = time.monotonic()
                self.store.save_daemon(daemon)
                self._adopt(daemon, served)
                self._event(daemon, "recovered", {"pid": daemon.pid, "instances": len(served)})
                return
            log.error("daemon %s could not be recovered (%s); forgetting it", daemon.id, err)
        else:
            log.warning("daemon %s is dead and recover_policy is %r: forgetting it and its %d image(s)",
                        daemon.id, policy, len(served))
        self._forget(daemon)

    def note_death(self, daemon_id: str, now: float | None = None) -> int:
        """Record one death of a daemon; how many quick deaths in a row happened within the last
        `failover_window` s. The death of a daemon never replaced before, or of a replacement that
        had been up `failover_settle` seconds, starts a new count.

        Kept in the manager's memory: a snapshotter restart starts the count again, which at
        worst allows `failover_max_deaths` more takeovers.
        """
        t = time.monotonic() if now is None else now
        with self._lock:
            deaths = self._deaths[daemon_id]
            since = self._recovered_at.get(daemon_id)
            if since is None or t - since >= self.failover_settle:
                deaths.clear()
            deaths.append(t)
            while deaths and deaths[0] < t - self.failover_window:
                deaths.popleft()
            return len(deaths)

    def _forget(self, daemon: DaemonRecord) -> None:
        """Clear what a dead daemon left (stop hook: no process, stale mounts) and drop its records."""
        try:
            self._hook("nydus_daemon_stop", daemon=daemon)
        except Exception:
            log.exception("clearing the remains of daemon %s failed", daemon.id)
        self.store.delete_daemon(daemon.id)
        self._remove_daemon_dirs(daemon)
        self._event(daemon, "stopped", {"pid": daemon.pid, "forgotten": True})

    # ------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------

    def _meta_lock(self, meta_id: str) -> threading.Lock:
        with self._lock:
            return self._meta_locks[meta_id]

    def _resupervise(self, daemon: DaemonRecord) -> None:
        """After a snapshotter restart: make sure the holder keeps the live daemon's session; if
        it does not (a new holder), the daemon sends it again (its ready hook asks for
        ``sendfd``), as upstream's ``SendStates``."""
        if self.session_holder is None or daemon.supervisor_path is None:
            return
        try:
            if self.session_holder.ensure(daemon.id).has_state:
                return
        except HolderError:
            log.exception("daemon %s: no session holder; it cannot be failed over", daemon.id)
            return
        try:
            self._hook("nydus_daemon_wait_ready", daemon=daemon, timeout=self.ready_timeout)
        except Exception:
            log.exception("daemon %s did not hand its session to the new supervisor", daemon.id)

    def _new_record(self, mode: DaemonMode, mountpoint: Path) -> DaemonRecord:
        did = new_daemon_id()
        level = self.config.log.level.lower()
        supervisor = None
        if self.session_holder is not None:
            supervisor = self.session_holder.ensure(did).path
        return DaemonRecord(
            id=did,
            fs_driver=self.fs_driver,
            mode=mode,
            api_socket=self.root / "socket" / did / "api.sock",
            mountpoint=mountpoint,
            config_dir=self.root / "config" / did,
            log_dir=Path(self.config.log_dir) / did,
            program=self.config.daemon.nydusd_path,
            thread_num=self.config.daemon.threads_number,
            log_level=_LOG_LEVELS.get(level, level),
            failover_policy=self.config.daemon.failover_policy,
            supervisor_path=supervisor,
        )

    def _prepare_cache(self, image: ImageSource) -> None:
        """Create the cache dir and copy the image's ``*.blob.meta`` files into it (as upstream does).

        The meta layer tar carries them beside the bootstrap; with them in the cache a daemon
        does not have to fetch blob metadata from the registry.
        """
        cache = Path(self.config.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        upper = self.root / "snapshots" / image.meta_id / "fs"
        for folder in dict.fromkeys((image.bootstrap.parent, upper)):
            for meta in folder.glob("*.blob.meta"):
                target = cache / meta.name
                if not target.exists():
                    tmp = cache / f".{meta.name}.tmp"
                    shutil.copyfile(meta, tmp)
                    os.replace(tmp, target)

    def _write_config(self, path: Path, image: ImageSource, labels: Mapping[str, str]) -> None:
        doc = build_config(
            self.template,
            image_ref=image.image_ref,
            rafs_key=image.meta_id,
            cache_dir=Path(self.config.cache_dir),
            labels=labels,
            pm=self.pm,
            remote=self.config.remote,
        )
        write_private_json(path, doc)

    def _start_dedicated(self, image: ImageSource, labels: Mapping[str, str], snapshot_dir: Path) -> Instance:
        daemon = self._new_record(DaemonMode.DEDICATED, snapshot_dir / "mnt")
        inst = Instance(
            snapshot_id=image.meta_id,
            daemon_id=daemon.id,
            image_ref=image.image_ref,
            bootstrap=image.bootstrap,
            mountpoint=daemon.mountpoint,
            snapshot_dir=snapshot_dir,
            fs_driver=self.fs_driver,
            config_path=daemon.config_dir / "config.json",
        )
        assert inst.config_path is not None
        self._write_config(inst.config_path, image, labels)
        self._launch(daemon, inst)
        with self._lock:
            self._daemons[daemon.id] = daemon
        return inst

    def _launch(self, daemon: DaemonRecord, inst: Instance | None) -> None:
        """Record a new daemon, start it and wait until it serves; forget it again if that fails."""
        self.store.save_daemon(daemon)
        try:
            self._start(daemon, inst)
            self._wait_ready(daemon)
        except BaseException:
            self._discard(daemon)
            raise

    def _ensure_shared(self) -> DaemonRecord:
        with self._shared_lock:
            if self._shared is not None:
                return self._shared
            daemon = self._new_record(DaemonMode.SHARED, self.root / "mnt")
            self._launch(daemon, None)
            with self._lock:
                self._daemons[daemon.id] = daemon
                self._shared = daemon
            return daemon

    def _attach_shared(self, image: ImageSource, labels: Mapping[str, str], snapshot_dir: Path) -> Instance:
        with self._lock:
            current = self._shared
        if current is not None and not self._hook_alive(current):
            self._recover_dead(current, reason=f"not serving when snapshot {image.meta_id} was attached")
        daemon = self._ensure_shared()
        inst = Instance(
            snapshot_id=image.meta_id,
            daemon_id=daemon.id,
            image_ref=image.image_ref,
            bootstrap=image.bootstrap,
            mountpoint=daemon.mountpoint / image.meta_id,
            snapshot_dir=snapshot_dir,
            fs_driver=self.fs_driver,
            config_path=daemon.config_dir / image.meta_id / "config.json",
        )
        assert inst.config_path is not None
        self._write_config(inst.config_path, image, labels)
        try:
            with self._shared_lock:  # a hot upgrade swaps the shared daemon's process under it
                self._hook("nydus_instance_attach", daemon=daemon, instance=inst)
            self._wait_ready(daemon)
        except BaseException:
            shutil.rmtree(inst.config_path.parent, ignore_errors=True)
            raise
        return inst

    def _release(self, inst: Instance) -> None:
        with self._lock:
            daemon = self._daemons.get(inst.daemon_id)
        if daemon is None:  # daemon_mode none, or the daemon was forgotten already
            self._drop_instance(inst)
            return
        if daemon.mode is DaemonMode.SHARED:
            with self._shared_lock:  # not while a hot upgrade swaps its process
                self._hook("nydus_instance_detach", daemon=daemon, instance=inst)
            self._drop_instance(inst)
            if inst.config_path is not None:
                shutil.rmtree(inst.config_path.parent, ignore_errors=True)
            return
        self._hook("nydus_instance_detach", daemon=daemon, instance=inst)
        # Under the recover lock: the liveness monitor must not take the stop for a death and
        # fail the daemon over while it is being stopped (it finds it forgotten afterwards).
        with self._recover_lock:
            self._hook("nydus_daemon_stop", daemon=daemon)
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

    def _discard(self, daemon: DaemonRecord) -> None:
        """Undo a daemon whose start failed: stop whatever runs, drop its records and files."""
        try:
            self._hook("nydus_daemon_stop", daemon=daemon)
        except Exception:
            log.exception("stopping the failed daemon %s", daemon.id)
        self.store.delete_daemon(daemon.id)
        self._remove_daemon_dirs(daemon, keep_logs=True)

    def _remove_daemon_dirs(self, daemon: DaemonRecord, *, keep_logs: bool = False) -> None:
        if self.session_holder is not None:
            self.session_holder.remove(daemon.id)  # after the stop hook: the mount is gone already
        with self._lock:
            self._deaths.pop(daemon.id, None)
            self._recovered_at.pop(daemon.id, None)
        shutil.rmtree(daemon.config_dir, ignore_errors=True)
        shutil.rmtree(daemon.api_socket.parent, ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(daemon.log_dir, ignore_errors=True)

    def _start(self, daemon: DaemonRecord, inst: Instance | None) -> None:
        pid = self._hook("nydus_daemon_start", daemon=daemon, instance=inst, config=self.config)
        daemon.pid = int(pid)
        self.store.save_daemon(daemon)
        self._event(daemon, "started", {"pid": daemon.pid})

    def _wait_ready(self, daemon: DaemonRecord) -> None:
        ok = self._hook("nydus_daemon_wait_ready", daemon=daemon, timeout=self.ready_timeout)
        if not ok:
            raise Unavailable(
                f"daemon {daemon.id} (pid {daemon.pid}, {daemon.program}) did not become ready within "
                f"{self.ready_timeout:g}s; see its log in {daemon.log_dir}"
            )
        self.store.save_daemon(daemon)  # the hook may have learnt the daemon's version
        self._event(daemon, "ready", {"pid": daemon.pid})

    def _hook_alive(self, daemon: DaemonRecord) -> bool:
        return bool(self._hook("nydus_daemon_alive", daemon=daemon))

    def _hook(self, name: str, **kwargs: Any) -> Any:
        """Call a firstresult lifecycle hook; no answer at all means no plugin owns the driver."""
        result = getattr(self.pm.hook, name)(**kwargs)
        if result is None:
            daemon: DaemonRecord = kwargs["daemon"]
            names = sorted(n for n, _ in self.pm.list_name_plugin())
            raise NoBackendError(
                f"no backend plugin handles fs_driver {daemon.fs_driver!r} ({name} of daemon {daemon.id}; "
                f"installed plugins: {', '.join(names) or 'none'})"
            )
        return result

    def _event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        try:
            self.pm.hook.nydus_daemon_event(daemon=daemon, event=event, detail=dict(detail))
        except Exception:
            log.exception("a nydus_daemon_event listener failed on %s of daemon %s", event, daemon.id)
