"""Processes the snapshotter starts for daemons: spawn, reap, find by command line, stop.

Backend-neutral: any daemon program the snapshotter runs is started here in its own session (so
that it outlives the snapshotter, whose containers read through it) and found again after a
snapshotter restart by the API socket on its command line (a recorded pid alone could have been
reused by another process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

STOP_GRACE = 5.0

# Children we spawned, so they can be reaped (no zombies) and their exit noticed while waiting,
# and the exit status of the last ones reaped (for the message saying a daemon died at start).
_children: dict[int, subprocess.Popen[bytes]] = {}
_statuses: dict[int, int] = {}


def spawn(
    argv: Sequence[str], log_file: Path | None, *, what: str = "daemon", shown: str | None = None
) -> int:
    """Start `argv` in a new session with stdin closed and stdout/stderr appended to `log_file`
    (inherited when ``None``); returns the pid. `shown` is what the log says instead of `argv`."""
    out = None if log_file is None else open(log_file, "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            list(argv),
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
    log.info("started %s: pid %d: %s", what, proc.pid, shown or " ".join(argv))
    return proc.pid


def child_status(pid: int) -> int | None:
    """Exit status of a child we spawned that has exited, ``None`` otherwise."""
    child = _children.get(pid)
    return _statuses.get(pid) if child is None else child.returncode


def is_child(pid: int) -> bool:
    return pid in _children or pid in _statuses


def exited(pid: int) -> bool:
    """True once `pid` is gone (reaping it when it is our child, or a zombie)."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
            if len(_statuses) > 256:
                _statuses.clear()
            _statuses[pid] = child.returncode
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
    while not exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def names(pid: int, token: Path | str) -> bool:
    """Whether `pid` is a live process with `token` (an API socket, a program) as one argument."""
    return pid > 0 and os.fsencode(str(token)) in cmdline(pid)


def processes_naming(token: Path | str) -> list[int]:
    """Every live process with `token` as one argument of its command line."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and names(int(entry), token) and not exited(int(entry)):
            found.append(int(entry))
    return found


def flag_value(pid: int, flag: str) -> str | None:
    """The argument after `flag` on `pid`'s command line (``--apisock``), ``None`` without it."""
    args = cmdline(pid)
    try:
        return os.fsdecode(args[args.index(os.fsencode(flag)) + 1])
    except (ValueError, IndexError):
        return None


def api_socket_processes() -> Iterator[tuple[int, Path]]:
    """(pid, API socket) of every live process started with ``--apisock`` (daemon programs,
    warm standbys, upgrade generations): what start-up clean-ups compare with the records."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        flag = flag_value(pid, "--apisock")
        if flag is not None and not exited(pid):
            yield pid, Path(flag)


def start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def serving_pid(api_socket: Path) -> int | None:
    """The pid bound to a unix socket (``SO_PEERCRED``), ``None`` if nobody listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(api_socket))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


def kill_now(pid: int, token: Path | str) -> None:
    """SIGKILL `pid` if it is still the process naming `token`, and wait until it is gone."""
    if pid <= 0 or exited(pid) or not names(pid, token):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    gone_within(pid, STOP_GRACE)


def terminate(pid: int, token: Path | str, grace: float = STOP_GRACE, what: str = "daemon") -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; a process that does not name `token` (pid
    reuse) is left alone."""
    if pid <= 0 or exited(pid) or not names(pid, token):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if exited(pid):
                return
            time.sleep(0.02)
        log.warning("%s (pid %d) did not exit after %s", what, pid, sig.name)
