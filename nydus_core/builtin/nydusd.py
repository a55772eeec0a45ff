"""Default lifecycle hooks for ``fs_driver = "fusedev"``: run a nydusd-compatible program.

The program is ``[daemon] nydusd_path`` (our ``nydusd-py``, or a real ``nydusd``): it is spawned
with upstream's command line, in its own session so that it outlives the snapshotter (running
containers read through it), and driven through upstream's HTTP API on its unix socket.

Dedicated daemons get the image on the command line (``--config --bootstrap``); the shared
daemon starts empty and receives images by ``POST /api/v1/mount``.

Under ``recover_policy = "failover"`` the daemon also gets ``--supervisor --id``; once it is
RUNNING it is told ``sendfd`` (its FUSE session goes to the session holder), and when it dies a
new one is spawned on the still-mounted mountpoint and driven ``takeover`` → ``start`` instead of
clearing the mount; if that fails the daemon is restarted as under ``restart``.

A snapshotter killed in the middle of that leaves a replacement nobody recorded: at the next
start-up `reconcile` finds it by its command line (the API socket) and `failover` resumes it
from the state it reached (INIT: takeover and start; READY: start; RUNNING: adopt).

With ``[daemon] failover_standby`` the replacement is started ahead of time (standby.py): once a
daemon is ready (and after each failover or upgrade), its next generation waits in INIT, and
failover only drives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nydus_core.builtin import standby as standbys
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.client import (
    STATE_INIT,
    STATE_READY,
    STATE_RUNNING,
    NydusdApiError,
    NydusdClient,
    NydusdUnreachable,
)
from nydus_core.control.daemons.model import DaemonMode, DaemonRecord, Instance
from nydus_core.control.daemons.mounts import is_mounted, umount_tree
from nydus_core.errors import FailedPrecondition, Unavailable
from nydus_core.faults import crash_point
from nydus_core.hookspecs import hookimpl

log = logging.getLogger(__name__)

FS_DRIVER = "fusedev"
STOP_GRACE = 5.0
RECOVER_READY_TIMEOUT = 10.0
FAILOVER_ATTEMPTS = 5
EXIT_SETTLE = 1.0  # how long a replacement that stopped answering gets to show it died

# Children we spawned, so they can be reaped (no zombies) and their exit noticed while waiting.
_children: dict[int, subprocess.Popen[bytes]] = {}
# What a daemon was started with, to start its standbys the same way (daemon id -> args).
_launch_args: dict[str, tuple[Instance | None, SnapshotterConfig]] = {}
_standby_lock = threading.Lock()  # a standby is spawned, claimed or stopped by one thread at a time
_retired: set[str] = set()  # daemons stopped for good: a standby spawn still under way is dropped


def _mine(daemon: DaemonRecord) -> bool:
    return daemon.fs_driver == FS_DRIVER


def command_line(daemon: DaemonRecord, instance: Instance | None, config: SnapshotterConfig) -> list[str]:
    """Upstream's nydusd argv (flags in upstream's order, zero values left out)."""
    program = shutil.which(daemon.program) if daemon.program else None
    if program is None:
        raise FailedPrecondition(
            f"nydusd program {daemon.program!r} not found (set [daemon] nydusd_path or --nydusd-path)"
        )
    argv = [program, "fuse"]
    if daemon.thread_num > 0:
        argv += ["--thread-num", str(daemon.thread_num)]
    if daemon.mode is DaemonMode.DEDICATED:
        if instance is None or instance.config_path is None:
            raise ValueError(f"dedicated daemon {daemon.id} needs an instance with a config file")
        argv += ["--config", str(instance.config_path), "--bootstrap", str(instance.bootstrap)]
    argv += ["--mountpoint", str(daemon.mountpoint), "--apisock", str(daemon.api_socket)]
    argv += ["--log-level", daemon.log_level or "info"]
    if config.daemon.log_rotation_size > 0:
        argv += ["--log-rotation-size", str(config.daemon.log_rotation_size)]
    if not config.log.log_to_stdout:
        argv += ["--log-file", str(daemon.log_dir / "nydusd.log")]
    if daemon.supervisor_path is not None:
        argv += ["--supervisor", str(daemon.supervisor_path), "--id", daemon.id]
    if daemon.failover_policy:
        argv += ["--failover-policy", daemon.failover_policy]
    return argv


def spawn(
    daemon: DaemonRecord, instance: Instance | None, config: SnapshotterConfig, extra: Sequence[str] = ()
) -> int:
    argv = command_line(daemon, instance, config) + list(extra)
    daemon.api_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    daemon.api_socket.unlink(missing_ok=True)
    if not is_mounted(daemon.mountpoint):
        # Never stat a live mount: under failover its daemon is dead and nobody answers until
        # the process spawned here takes over (mkdir(exist_ok) stats an existing path).
        daemon.mountpoint.mkdir(parents=True, exist_ok=True)
    daemon.log_dir.mkdir(parents=True, exist_ok=True)
    out = None if config.log.log_to_stdout else open(daemon.log_dir / "nydusd.out", "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,  # not in our process group: a signal to the snapshotter spares it
            close_fds=True,
        )
    finally:
        if out is not None:
            out.close()
    _children[proc.pid] = proc
    log.info("started daemon %s: pid %d: %s", daemon.id, proc.pid, " ".join(argv))
    return proc.pid


def _exited(pid: int) -> bool:
    """True once `pid` is gone (reaping it when it is our child)."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
            return True
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return True
    return False


def gone_within(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` for `pid` to exit (reaping it when it is our child)."""
    deadline = time.monotonic() + timeout
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _is_our_daemon(pid: int, daemon: DaemonRecord) -> bool:
    """Guard against pid reuse: the process must have been started with this daemon's socket."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return os.fsencode(str(daemon.api_socket)) in args


def processes_of(daemon: DaemonRecord) -> list[int]:
    """Every live process started for this daemon (its API socket is on the command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _is_our_daemon(int(entry), daemon) and not _exited(int(entry)):
            found.append(int(entry))
    return found


def serving_pid(daemon: DaemonRecord) -> int | None:
    """The pid bound to the daemon's API socket (``SO_PEERCRED``), ``None`` if nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(daemon.api_socket))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def reconcile(daemon: DaemonRecord) -> bool:
    """Point ``daemon.pid`` at the process that serves (or will serve) the daemon; kill the rest.

    Several processes name the same API socket only after a recovery was interrupted: each
    spawn unlinks the socket first, so the one bound to it is the latest; the others can no
    longer be reached and would live on as orphans. A process on another socket of the daemon's
    directory that is not its recorded standby (a standby spawned but not yet recorded) is
    killed too. True when ``daemon.pid`` changed.
    """
    _kill_unrecorded_generations(daemon)
    procs = processes_of(daemon)
    if not procs:
        return False
    keep = serving_pid(daemon)
    if keep not in procs:
        keep = daemon.pid if daemon.pid in procs else max(procs, key=_start_time)
    for pid in procs:
        if pid != keep:
            log.warning("daemon %s: killing stale process %d (not bound to %s)", daemon.id, pid,
                        daemon.api_socket)
            kill_now(attrs.evolve(daemon, pid=pid))
    changed = keep != daemon.pid
    if changed:
        log.warning("daemon %s: record named pid %d, the process serving it is %d", daemon.id, daemon.pid,
                    keep)
        daemon.pid = keep
    return changed


def apisock_of(pid: int) -> Path | None:
    """The ``--apisock`` of a daemon process (from its command line), None if it has none."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        return Path(os.fsdecode(args[args.index(b"--apisock") + 1]))
    except (OSError, ValueError, IndexError):
        return None


def _kill_unrecorded_generations(daemon: DaemonRecord) -> None:
    """Start-up: kill live processes on another API socket of the daemon's socket directory that
    neither the record nor the standby record names (nothing would ever drive or stop them)."""
    standby = standbys.recorded(daemon)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        sock = apisock_of(pid)
        if sock is None or sock.parent != daemon.api_socket.parent or sock == daemon.api_socket:
            continue
        if (standby is not None and pid == standby.pid and sock == standby.api_socket) or _exited(pid):
            continue
        log.warning("daemon %s: killing pid %d on %s: no record names it", daemon.id, pid, sock)
        kill_now(attrs.evolve(daemon, api_socket=sock, pid=pid))


def kill_now(daemon: DaemonRecord) -> None:
    """SIGKILL a process of ours and wait until it is gone.

    For a process being replaced under ``failover``: a graceful stop would unmount the mount
    (nydusd's SIGTERM behaviour) or unlink the API socket that its successor now owns, while
    the session is safe in the holder whatever happens to the process.
    """
    pid = daemon.pid
    if pid <= 0 or _exited(pid) or not _is_our_daemon(pid, daemon):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    gone_within(pid, STOP_GRACE)


def terminate(daemon: DaemonRecord, grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; a process that is not ours is left alone."""
    pid = daemon.pid
    if pid <= 0 or _exited(pid) or not _is_our_daemon(pid, daemon):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _exited(pid):
                return
            time.sleep(0.02)
        log.warning("daemon %s (pid %d) did not exit after %s", daemon.id, pid, sig.name)


def clear_vestige(daemon: DaemonRecord) -> None:
    """Remove what a dead daemon leaves: mounts at and under its mountpoint, its socket."""
    umount_tree(daemon.mountpoint)
    daemon.api_socket.unlink(missing_ok=True)


def wait_ready(daemon: DaemonRecord, timeout: float, state: str = STATE_RUNNING) -> bool:
    """Wait for `state`; a supervised daemon that reached RUNNING is told to ``sendfd``."""
    deadline = time.monotonic() + timeout
    with NydusdClient(daemon.api_socket, timeout=max(1.0, min(timeout, 5.0))) as client:
        while True:
            try:
                info = client.daemon_info()
                if info.state == state:
                    daemon.version = str(info.version.get("package_ver", "")) or daemon.version
                    if state == STATE_RUNNING and daemon.supervisor_path is not None:
                        _send_fd(client, daemon)
                    return True
            except NydusdUnreachable:
                pass
            child = _children.get(daemon.pid)
            if child is not None and _exited(daemon.pid):
                raise Unavailable(
                    f"daemon {daemon.id} ({daemon.program}, pid {daemon.pid}) exited with status "
                    f"{child.returncode} before it was ready; see its log in {daemon.log_dir}"
                )
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _send_fd(client: NydusdClient, daemon: DaemonRecord) -> None:
    try:
        client.send_fd()
    except (NydusdApiError, NydusdUnreachable) as e:
        log.error("daemon %s did not hand its FUSE session to the supervisor (no failover for it): %s",
                  daemon.id, e)


def failover(daemon: DaemonRecord, instances: Sequence[Instance], config: SnapshotterConfig) -> bool:
    """Spawn a replacement on the live mount and have it take the session over from the holder.

    No `clear_vestige`: the mount (held by the holder's fd) must stay. A replacement left by a
    snapshotter that died mid-failover (``daemon.pid``, set by `reconcile`) is resumed first. A
    replacement that dies while it starts (a resent request that kills every daemon) is replaced
    again, at most `FAILOVER_ATTEMPTS` times: nydusd-py's in-flight journal turns such a request
    into EIO after three deaths, so the attempts end well before the limit. False when no
    takeover happened (the caller then restarts the daemon).
    """
    if daemon.supervisor_path is None or not daemon.supervisor_path.exists():
        return False
    t0 = time.monotonic()
    if _resume(daemon):
        log.info("daemon %s: resumed the interrupted failover of pid %d", daemon.id, daemon.pid)
        return True
    kill_now(daemon)  # a hung process that no longer answers (SIGTERM would unmount)
    if _promote_standby(daemon):
        took = (time.monotonic() - t0) * 1000
        log.info("daemon %s failed over to its standby, pid %d, in %.1f ms", daemon.id, daemon.pid, took)
        return True
    dedicated = daemon.mode is DaemonMode.DEDICATED
    for attempt in range(1, FAILOVER_ATTEMPTS + 1):
        daemon.api_socket.unlink(missing_ok=True)
        daemon.pid = spawn(daemon, instances[0] if dedicated else None, config)
        crash_point("failover-spawned")
        try:
            if not wait_ready(daemon, RECOVER_READY_TIMEOUT, STATE_INIT):
                raise Unavailable(f"daemon {daemon.id} did not reach INIT")
            _drive(daemon, STATE_INIT)
        except (Unavailable, NydusdApiError, NydusdUnreachable) as e:
            # A daemon killed while it answers closes its socket before its exit status exists.
            died = gone_within(daemon.pid, EXIT_SETTLE)
            log.error("failover of daemon %s, attempt %d: %s", daemon.id, attempt, e)
            kill_now(daemon)
            if died:
                continue  # it died serving: the journal has counted what was in flight
            return False
        took = (time.monotonic() - t0) * 1000
        log.info("daemon %s failed over to pid %d in %.0f ms (attempt %d)", daemon.id, daemon.pid, took,
                 attempt)
        return True
    log.error("daemon %s: %d replacements died in a row; giving failover up", daemon.id, FAILOVER_ATTEMPTS)
    return False


def _drive(daemon: DaemonRecord, state: str) -> None:
    """Take a replacement from `state` (INIT or READY) to RUNNING: takeover, start, sendfd."""
    t0 = time.monotonic()
    with NydusdClient(daemon.api_socket, timeout=RECOVER_READY_TIMEOUT) as client:
        if state == STATE_INIT:
            client.takeover()
            crash_point("failover-taken-over")
        t_taken = time.monotonic()
        client.start()
    t_started = time.monotonic()
    if not wait_ready(daemon, RECOVER_READY_TIMEOUT):
        raise Unavailable(f"daemon {daemon.id} did not reach RUNNING after takeover")
    crash_point("failover-started")
    log.debug("daemon %s, pid %d: takeover %.1f ms, start (serving) %.1f ms, RUNNING + sendfd %.1f ms",
              daemon.id, daemon.pid, (t_taken - t0) * 1000, (t_started - t_taken) * 1000,
              (time.monotonic() - t_started) * 1000)  # fmt: skip


def _resume(daemon: DaemonRecord) -> bool:
    """Finish a failover a dead snapshotter began: ``daemon.pid`` is a live replacement of ours
    in INIT (spawned), READY (took the session over) or RUNNING (serves, was not recorded)."""
    pid = daemon.pid
    if pid <= 0 or _exited(pid) or not _is_our_daemon(pid, daemon):
        return False
    try:
        with NydusdClient(daemon.api_socket, timeout=3.0) as client:
            state = client.state()
        log.info("daemon %s: found replacement pid %d in state %s", daemon.id, pid, state)
        if state == STATE_RUNNING:
            return wait_ready(daemon, RECOVER_READY_TIMEOUT)  # sends its session to the holder
        if state not in (STATE_INIT, STATE_READY):
            return False
        _drive(daemon, state)
        return True
    except (Unavailable, NydusdApiError, NydusdUnreachable, OSError) as e:
        log.warning("daemon %s: cannot resume pid %d (%s); replacing it", daemon.id, pid, e)
        return False


# --------------------------------------------------------------------------------------------
# Warm standby ([daemon] failover_standby)
# --------------------------------------------------------------------------------------------


def _wants_standby(daemon: DaemonRecord, config: SnapshotterConfig) -> bool:
    d = config.daemon
    return d.failover_standby and d.recover_policy == "failover" and daemon.supervisor_path is not None


def start_standby(daemon: DaemonRecord) -> None:
    """Spawn `daemon`'s next generation with ``--upgrade`` on the other socket, unless one runs
    (a standby of another program, left from before a hot upgrade, is replaced).

    Does not wait for it: failover waits for INIT if it has to use a standby still loading.
    Needs the arguments the daemon was started with in this process; a daemon re-adopted after a
    snapshotter restart keeps the standby recorded before (if any) until its next failover.
    """
    with _standby_lock:
        args = _launch_args.get(daemon.id)
        if args is None or daemon.id in _retired or not _wants_standby(daemon, args[1]):
            return
        current = standbys.recorded(daemon)
        if current is not None and standbys.runs(current.pid, current.api_socket):
            program = shutil.which(daemon.program) or daemon.program
            if standbys.runs(current.pid, Path(program)):
                return
            log.info("standby of daemon %s runs another program than %s (hot upgrade): replacing it",
                     daemon.id, program)  # fmt: skip
            _kill_standby(daemon, current)
        sock = standbys.socket_for(daemon)
        pid = spawn(attrs.evolve(daemon, api_socket=sock, pid=0), args[0], args[1], ["--upgrade"])
        crash_point("standby-spawned")
        standbys.record(daemon, standbys.Standby(pid, sock))
        log.info("standby of daemon %s: pid %d on %s", daemon.id, pid, sock)


def start_standby_later(daemon: DaemonRecord) -> None:
    """`start_standby` in a thread: never on the path of a start or a failover."""
    if daemon.id not in _launch_args:
        return

    def run() -> None:
        try:
            start_standby(daemon)
        except Exception:
            log.exception("cannot start a standby for daemon %s (failover will spawn cold)", daemon.id)

    threading.Thread(target=run, name=f"standby-{daemon.id}", daemon=True).start()


def _promote_standby(daemon: DaemonRecord) -> bool:
    """Failover to the recorded standby: point the record at it and drive it from the state it is
    in (normally INIT; READY or RUNNING when a snapshotter died in the middle of a promotion).

    The standby's record file stays until the daemon record names it (then `standbys.recorded`
    drops it): a snapshotter killed meanwhile finds the promoted process again at start-up.
    False (record unchanged) when there is no live standby or it could not be driven.
    """
    with _standby_lock:
        found = standbys.recorded(daemon)
        if found is None:
            return False
        if not standbys.runs(found.pid, found.api_socket):
            log.warning("standby of daemon %s (pid %d) is gone; spawning the replacement cold", daemon.id,
                        found.pid)  # fmt: skip
            standbys.forget(daemon)
            found.api_socket.unlink(missing_ok=True)
            return False
        old_socket, old_pid = daemon.api_socket, daemon.pid
        daemon.api_socket, daemon.pid = found.api_socket, found.pid
        try:
            _drive(daemon, STATE_INIT)  # the usual case, without asking its state first
            promoted = True
        except NydusdApiError:  # not in INIT: a promotion a dead snapshotter had begun
            promoted = _resume(daemon)
        except (Unavailable, NydusdUnreachable) as e:
            log.warning("standby of daemon %s (pid %d) failed to take over: %s", daemon.id, found.pid, e)
            promoted = False
        if promoted:
            old_socket.unlink(missing_ok=True)
            return True
        kill_now(daemon)
        standbys.forget(daemon)
        daemon.api_socket, daemon.pid = old_socket, old_pid
        return False


def stop_standby(daemon: DaemonRecord, *, retire: bool) -> None:
    """Kill `daemon`'s standby (SIGKILL is safe: it has not touched the mount or the session).
    `retire`: the daemon is stopped for good, a standby spawn still under way is dropped too."""
    with _standby_lock:
        if retire:
            _retired.add(daemon.id)
            _launch_args.pop(daemon.id, None)
        found = standbys.recorded(daemon)
        if found is not None:
            _kill_standby(daemon, found)


def _kill_standby(daemon: DaemonRecord, found: standbys.Standby) -> None:
    standbys.forget(daemon)
    if standbys.runs(found.pid, found.api_socket):
        kill_now(attrs.evolve(daemon, api_socket=found.api_socket, pid=found.pid))
        log.info("standby of daemon %s (pid %d) stopped", daemon.id, found.pid)
    found.api_socket.unlink(missing_ok=True)


def attach(daemon: DaemonRecord, instance: Instance) -> None:
    if daemon.mode is not DaemonMode.SHARED:
        return  # a dedicated daemon mounts its image when it starts
    if instance.config_path is None:
        raise ValueError(f"instance of snapshot {instance.snapshot_id} has no daemon config file")
    with NydusdClient(daemon.api_socket) as client:
        client.mount(instance.snapshot_id, instance.bootstrap, instance.config_path.read_text())


# --------------------------------------------------------------------------------------------
# Hook implementations
# --------------------------------------------------------------------------------------------


@hookimpl
def nydus_daemon_start(
    daemon: DaemonRecord, instance: Instance | None, config: SnapshotterConfig
) -> int | None:
    if not _mine(daemon):
        return None
    _launch_args[daemon.id] = (instance, config)
    return spawn(daemon, instance, config)


@hookimpl
def nydus_daemon_wait_ready(daemon: DaemonRecord, timeout: float) -> bool | None:
    if not _mine(daemon):
        return None
    return wait_ready(daemon, timeout)


@hookimpl
def nydus_instance_attach(daemon: DaemonRecord, instance: Instance) -> bool | None:
    if not _mine(daemon):
        return None
    attach(daemon, instance)
    return True


@hookimpl
def nydus_instance_detach(daemon: DaemonRecord, instance: Instance) -> bool | None:
    if not _mine(daemon):
        return None
    if daemon.mode is DaemonMode.SHARED:
        try:
            with NydusdClient(daemon.api_socket) as client:
                client.umount(instance.snapshot_id)
        except NydusdApiError as e:
            if e.status != 404:
                raise
            log.info("snapshot %s was not mounted in daemon %s", instance.snapshot_id, daemon.id)
        umount_tree(instance.mountpoint)
    return True


@hookimpl
def nydus_daemon_alive(daemon: DaemonRecord) -> bool | None:
    if not _mine(daemon):
        return None
    if daemon.pid > 0 and _exited(daemon.pid):
        return False  # no need to ask: its process is gone (what the liveness monitor sees first)
    try:
        with NydusdClient(daemon.api_socket, timeout=3.0) as client:
            return client.state() == STATE_RUNNING
    except (NydusdUnreachable, NydusdApiError, OSError):
        return False


@hookimpl
def nydus_daemon_reconcile(daemon: DaemonRecord) -> bool | None:
    if not _mine(daemon):
        return None
    return reconcile(daemon)


@hookimpl
def nydus_daemon_stop(daemon: DaemonRecord) -> bool | None:
    if not _mine(daemon):
        return None
    stop_standby(daemon, retire=True)
    terminate(daemon)
    clear_vestige(daemon)
    return True


@hookimpl
def nydus_daemon_event(daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
    """A standby once the record is saved (``ready``, ``recovered``, ``upgraded`` come after the
    manager persisted it): a snapshotter killed before that never meets a standby on the socket
    its record still names."""
    if _mine(daemon) and event in ("ready", "recovered", "upgraded"):
        start_standby_later(daemon)


@hookimpl
def nydus_daemon_recover(
    daemon: DaemonRecord, instances: Sequence[Instance], config: SnapshotterConfig
) -> bool | None:
    if not _mine(daemon):
        return None
    ordered = sorted(instances, key=lambda i: i.seq)
    if daemon.mode is DaemonMode.DEDICATED and not ordered:
        log.warning("dedicated daemon %s has no recorded image; not respawning it", daemon.id)
        return False
    _launch_args[daemon.id] = (ordered[0] if daemon.mode is DaemonMode.DEDICATED else None, config)
    if config.daemon.recover_policy == "failover" and failover(daemon, ordered, config):
        return True
    stop_standby(daemon, retire=False)  # it waits for a session that is about to be cleared
    terminate(daemon)  # a hung process that no longer answers
    clear_vestige(daemon)
    daemon.pid = spawn(daemon, ordered[0] if daemon.mode is DaemonMode.DEDICATED else None, config)
    if not wait_ready(daemon, RECOVER_READY_TIMEOUT):
        return False
    for inst in ordered if daemon.mode is DaemonMode.SHARED else ():
        attach(daemon, inst)
    log.info("daemon %s respawned as pid %d with %d image(s)", daemon.id, daemon.pid, len(ordered))
    return True
