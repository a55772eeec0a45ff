"""The ``fusedev`` backend: nydusd-compatible daemons serving RAFS over FUSE, with failover.

The program is ``[daemon] nydusd_path`` (our ``nydusd-py``, or a real ``nydusd``), driven by
`nydus_core.control.daemons.nydusd.NydusdBackend` (upstream's command line and HTTP API). What
this backend adds is what keeps running containers alive when a daemon dies:

* under ``recover_policy = "failover"`` each daemon gets ``--supervisor --id`` and, once RUNNING,
  is told ``sendfd``: its FUSE session (the ``/dev/fuse`` fd and the saved INIT) goes to the
  session holder of the snapshotter root (`holder_client`, a process of its own that outlives the
  snapshotter); when the daemon dies a replacement takes the session over (`failover`) instead of
  the mount being cleared; if that fails the daemon is restarted as under ``restart``;
* the crash-loop breaker (`crash_loop`) gives failover up for a daemon that keeps dying;
* with ``[daemon] failover_standby`` the replacement is started ahead of time (`standby`): once a
  daemon is ready (and after each failover or upgrade), its next generation waits in INIT, and
  failover only drives it;
* ``PUT /api/v1/daemons/upgrade`` moves daemons onto another program the same way (`upgrade`);
* with ``[daemon] spare_daemon`` (the default) a new daemon is a process started ahead of need
  (`spare`), not a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nydus_core.control.daemons import process
from nydus_core.control.daemons.client import NydusdApiError, NydusdClient, NydusdUnreachable
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.control.daemons.nydusd import NydusdBackend
from nydus_core.errors import FailedPrecondition
from nydus_core.faults import crash_point
from nydus_core.records import BackendContext, Capabilities, ConfigOption
from nydus_fuse.backend import failover as failovers
from nydus_fuse.backend import upgrade as upgrades
from nydus_fuse.backend.client import FuseSessionClient
from nydus_fuse.backend.crash_loop import CrashLoopBreaker
from nydus_fuse.backend.holder_client import HolderError, SessionHolder
from nydus_fuse.backend.spare import SPARE_DAEMON, Spare
from nydus_fuse.backend.standby import Standbys

log = logging.getLogger(__name__)

NAME = "fusedev"
SUPERVISOR_PATH = "supervisor_path"  # backend_data key (upstream's ConfigState.SupervisorPath)

CAPABILITIES = Capabilities(
    daemon=True, dedicated_daemon=True, shared_daemon=True, failover=True, hot_upgrade=True
)

FAILOVER_STANDBY = ConfigOption(
    section="daemon",
    key="failover_standby",
    type=bool,
    default=False,
    description=(
        'with recover_policy = "failover", keep the next generation of each fusedev daemon started '
        "and waiting (imports done, image open, state INIT), so a death is taken over in "
        "milliseconds instead of the time a new interpreter needs; doubles the daemon processes"
    ),
)


class FusedevBackend(NydusdBackend):
    """`NydusdBackend` for ``nydusd fuse``, plus the session holder, failover, standby and upgrade.

    :param crash_loop: the crash-loop breaker's limits (tests lower them).
    """

    subcommand = "fuse"
    client_class = FuseSessionClient

    def __init__(self, crash_loop: CrashLoopBreaker | None = None) -> None:
        self.crash_loop = crash_loop or CrashLoopBreaker()
        self.standbys = Standbys(self)
        self.session_holder: SessionHolder | None = None
        self.spare: Spare | None = None

    # -- the backend as a whole ---------------------------------------------------------------
    def open(self, ctx: BackendContext, recorded: Sequence[DaemonRecord]) -> None:
        super().open(ctx, recorded)
        if ctx.config.daemon.recover_policy == "failover":
            log_file = Path(ctx.config.log_dir) / "session-holder.log"
            self.session_holder = SessionHolder(ctx.root, log_file=log_file)
        self._reconcile_holder(recorded)
        self._kill_unrecorded_daemons(recorded)
        if SPARE_DAEMON.get(ctx.config) and ctx.config.daemon_mode in ("dedicated", "shared"):
            log_dir = None if ctx.config.log.log_to_stdout else Path(ctx.config.log_dir)
            self.spare = Spare(ctx.root, ctx.config.daemon.nydusd_path, log_dir)
            self.spare.start_soon()  # in the background: serving is not delayed by it

    def _kill_unrecorded_daemons(self, recorded: Sequence[DaemonRecord]) -> None:
        """Start-up: kill daemon programs (and warm standbys) serving an API socket under
        ``<root>/socket/<id>/`` for a daemon id no record names. A snapshotter killed between
        spawning a daemon (or its standby) and recording it leaves them, and nothing would
        ever drive or stop them; per-record clean-up (`Standbys.kill_unrecorded_generations`)
        only sees the daemons that were recorded."""
        base = self.ctx.root / "socket"
        known = {d.id for d in recorded}
        for pid, sock in process.api_socket_processes():
            if sock.parent.parent != base or sock.parent.name in known:
                continue
            log.warning("killing pid %d on %s: no daemon record names %s", pid, sock, sock.parent.name)
            process.kill_now(pid, sock)

    def standby_enabled(self) -> bool:
        return bool(FAILOVER_STANDBY.get(self.config)) and self.config.daemon.recover_policy == "failover"

    def supervisor_path(self, daemon: DaemonRecord) -> Path | None:
        value = daemon.backend_data.get(SUPERVISOR_PATH)
        return Path(value) if value else None

    def _reconcile_holder(self, daemons: Sequence[DaemonRecord]) -> None:
        """Start-up: make the session holder agree with the records.

        Under ``failover`` the holder is started if none answers, and sessions it keeps for
        daemons that are not recorded (a snapshotter killed between forgetting a daemon and
        telling the holder) are dropped after their mount is cleared. Under another policy an
        idle holder left from an earlier ``failover`` configuration is told to exit.
        """
        if self.session_holder is None:
            with contextlib.suppress(HolderError):
                SessionHolder(self.ctx.root).shutdown()  # refused (and kept) while it holds a session
            return
        self.session_holder.ensure_running()
        known = {d.id for d in daemons}
        for daemon_id, info in self.session_holder.status().items():
            if daemon_id in known:
                continue
            mnt = Path(str(info.get("mountpoint") or ""))
            if info.get("has_session") and mnt.is_absolute() and self.ctx.root in mnt.parents:
                log.warning("session holder keeps the session of unrecorded daemon %s: unmounting %s",
                            daemon_id, mnt)  # fmt: skip
                umount_tree(mnt)
            self.session_holder.remove(daemon_id)

    def close(self) -> None:
        """The holder outlives the snapshotter on purpose: a daemon that dies while no
        snapshotter runs keeps its mount, and the next start-up fails it over."""
        if self.session_holder is not None:
            self.session_holder.close()
        if self.spare is not None:
            self.spare.stop()

    def take_spare(self, argv: Sequence[str], log_file: Path | None) -> int | None:
        return None if self.spare is None else self.spare.take(argv, log_file)

    def watch_pids(self) -> list[int]:
        holder = self.session_holder
        return [holder.known_pid] if holder is not None and holder.known_pid else []

    def sweep(self) -> None:
        """The holder died (it should not): start a new one and have every live daemon send its
        session again, so that the next daemon death can still be failed over."""
        holder = self.session_holder
        if holder is None:
            return
        try:
            if holder.pid() is not None:
                return
            log.error("the session holder of %s is gone: restarting it; live daemons re-send their sessions",
                      self.ctx.root)  # fmt: skip
            holder.ensure_running()
        except HolderError:
            log.exception("cannot restart the session holder")
            holder.known_pid = 0  # no busy loop on its pidfd: the sweeps retry
            return
        for daemon in self.ctx.daemons():
            self.adopt(daemon)

    def purge(self, root: Path) -> None:
        SessionHolder(root).shutdown(force=True)

    def check_upgrade(self) -> None:
        if self.config.daemon.recover_policy != "failover" or self.session_holder is None:
            raise FailedPrecondition(
                f'a hot upgrade needs [daemon] recover_policy = "failover" (a supervisor holding each '
                f"FUSE session); it is {self.config.daemon.recover_policy!r}"
            )

    # -- daemons ------------------------------------------------------------------------------
    def start(self, daemon: DaemonRecord, instance: Instance | None) -> int:
        if self.session_holder is not None and self.supervisor_path(daemon) is None:
            daemon.backend_data[SUPERVISOR_PATH] = str(self.session_holder.ensure(daemon.id).path)
        self.standbys.remember(daemon, instance)
        return self.spawn(daemon, instance, spare=True)

    def extra_args(self, daemon: DaemonRecord) -> list[str]:
        argv: list[str] = []
        sup = self.supervisor_path(daemon)
        if sup is not None:
            argv += ["--supervisor", str(sup), "--id", daemon.id]
        if daemon.failover_policy:
            argv += ["--failover-policy", daemon.failover_policy]
        return argv

    def on_running(self, client: NydusdClient, daemon: DaemonRecord) -> None:
        """A supervised daemon that reached RUNNING is told to ``sendfd``."""
        if self.supervisor_path(daemon) is None:
            return
        assert isinstance(client, FuseSessionClient)
        try:
            client.send_fd()
        except (NydusdApiError, NydusdUnreachable) as e:
            log.error("daemon %s did not hand its FUSE session to the supervisor (no failover for it): %s",
                      daemon.id, e)  # fmt: skip

    def reconcile(self, daemon: DaemonRecord) -> bool:
        """Kill what an interrupted upgrade or standby spawn left, then the default reconcile."""
        upgrades.kill_stray_generations(daemon)
        self.standbys.kill_unrecorded_generations(daemon)
        return super().reconcile(daemon)

    def adopt(self, daemon: DaemonRecord) -> None:
        """Make sure the holder keeps the live daemon's session; if it does not (a new holder),
        the daemon sends it again (`wait_ready` asks for ``sendfd``), as upstream's ``SendStates``."""
        if self.session_holder is None or self.supervisor_path(daemon) is None:
            return
        try:
            if self.session_holder.ensure(daemon.id).has_state:
                return
        except HolderError:
            log.exception("daemon %s: no session holder; it cannot be failed over", daemon.id)
            return
        try:
            self.wait_ready(daemon, self.ctx.ready_timeout)
        except Exception:
            log.exception("daemon %s did not hand its session to the new supervisor", daemon.id)

    def kill_now(self, daemon: DaemonRecord) -> None:
        """SIGKILL a process of ours and wait until it is gone: for a process being replaced
        under ``failover``, where a graceful stop would unmount the mount (nydusd's SIGTERM
        behaviour) or unlink the API socket that its successor now owns."""
        process.kill_now(daemon.pid, daemon.api_socket)

    def stop(self, daemon: DaemonRecord) -> None:
        self.standbys.stop(daemon, retire=True)
        super().stop(daemon)
        if self.session_holder is not None:
            self.session_holder.remove(daemon.id)  # after the stop: the mount is gone already
        self.crash_loop.forget(daemon.id)

    def recover(self, daemon: DaemonRecord, instances: Sequence[Instance]) -> bool:
        crash_point("failover-noticed")
        ordered = sorted(instances, key=lambda i: i.seq)
        if daemon.mode is DaemonMode.DEDICATED and not ordered:
            log.warning("dedicated daemon %s has no recorded image; not respawning it", daemon.id)
            return False
        self.standbys.remember(daemon, ordered[0] if daemon.mode is DaemonMode.DEDICATED else None)
        if self.config.daemon.recover_policy == "failover":
            held = False
            if self.session_holder is not None:
                try:
                    held = self.session_holder.holds(daemon.id)
                    self.session_holder.ensure(daemon.id)  # (re)starts a holder that went away
                except HolderError as e:
                    log.error("daemon %s: %s", daemon.id, e)
            if not held:
                log.warning("daemon %s has no supervised session to take over; restarting it", daemon.id)
            elif self.crash_loop.tripped(n := self.crash_loop.note_death(daemon.id)):
                log.error("daemon %s died %d times within %gs (limit %d): crash loop, giving failover up "
                          "and forgetting it", daemon.id, n, self.crash_loop.window,
                          self.crash_loop.max_deaths)  # fmt: skip
                return False
            elif failovers.failover(self, daemon, ordered):
                self.crash_loop.note_recovered(daemon.id)
                return True
        self.standbys.stop(daemon, retire=False)  # it waits for a session that is about to be cleared
        if not self.restart(daemon, ordered):
            return False
        self.crash_loop.note_recovered(daemon.id)
        return True

    def upgrade(
        self, daemon: DaemonRecord, instances: Sequence[Instance], program: str, version: str
    ) -> None:
        upgrades.upgrade(self, daemon, instances, program, version)

    def daemon_event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        """A standby once the record is saved (``ready``, ``recovered``, ``upgraded`` come after
        the manager persisted it): a snapshotter killed before that never meets a standby on the
        socket its record still names."""
        if event in ("ready", "recovered", "upgraded"):
            self.standbys.start_later(daemon)

    def describe(self, daemon: DaemonRecord) -> dict[str, Any]:
        sup = self.supervisor_path(daemon)
        return {"supervisor_path": "" if sup is None else str(sup)}
