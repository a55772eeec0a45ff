"""The spare daemon (``[daemon] spare_daemon``): a ``nydusd-py`` process started before Prepare.

A new dedicated daemon is otherwise a fresh interpreter importing pyfuse3, trio and the RAFS
reader while the container waits: most of a cold ``create``. The snapshotter keeps one process
that has done that (``nydusd-py spare``, niced to 19 so it barely competes with running
containers) and, when a daemon is needed, hands it the daemon's command line
(`nydus_fuse.daemon.spare`); it then is that daemon, with that command line in ``/proc``, so
everything that finds daemons by their API socket (records, reconcile, clean-ups) is unchanged.
A new spare is started at once.

The spare is the snapshotter's child and leaves when the snapshotter does (it watches its parent);
one left by a snapshotter killed at the wrong moment (while it was still importing) is killed at
the next start-up. Both happen in the background (`start_soon`): a snapshotter serves as soon as
it would without a spare, which matters most after a crash, when containerd is re-dialling it.
Its socket is ``<root>/spare/api.sock``, outside ``<root>/socket/``: it is no
daemon until it is handed a command line. A real ``nydusd`` has no spare mode:
its spare exits at once and daemons are then started cold (logged once).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from nydus_core.control.daemons import process
from nydus_core.records import ConfigOption

log = logging.getLogger(__name__)

SPARE_DAEMON = ConfigOption(
    section="daemon",
    key="spare_daemon",
    type=bool,
    default=True,
    description=(
        "keep one nydusd-py process started, imported and niced, that becomes the next fusedev "
        "daemon when one is needed, so Prepare does not wait for an interpreter start (a real "
        "nydusd has no spare mode: daemons then start cold)"
    ),
)

DIR_NAME = "spare"  # <root>/spare/: not under <root>/socket/, where every process is a daemon
TITLE_ROOM = 3072  # bytes of command line the spare can take over (a daemon's is well under 1 KiB)
TAKE_WAIT = 10.0  # how long a Prepare waits for a spare still importing (a cold start is slower)
MAX_FAILURES = 3  # spares that die untaken before the feature is given up for this run


class Spare:
    """The one spare of a snapshotter root: start it, hand it a command line, stop it."""

    def __init__(self, root: Path, program: str, log_dir: Path | None) -> None:
        self.socket = root / DIR_NAME / "api.sock"
        self.program = program
        self.log_dir = log_dir
        self.pid = 0
        self.failures = 0
        self.enabled = True
        self.stopped = False
        self._lock = threading.Lock()  # the pid: one hand-over, start or stop at a time

    # -- lifecycle ---------------------------------------------------------------------------
    def start_soon(self) -> None:
        """Start-up: kill an earlier snapshotter's spare, then start ours, in a thread.

        Neither may delay serving: after a snapshotter crash containerd re-dials its socket
        with a growing back-off (1 s, 1.6 s, ... in containerd 1.6), and every call it gets in
        the meantime fails. A Prepare that comes first finds no spare and starts its daemon cold.
        """
        threading.Thread(target=self._start_up, name="spare-daemon", daemon=True).start()

    def _start_up(self) -> None:
        try:
            self.kill_leftovers()
            self.start()
        except Exception:
            log.exception("spare daemon: cannot start one; daemons start cold")

    def start(self) -> None:
        """Start a spare unless one runs (or the feature was given up, or the spare stopped)."""
        with self._lock:
            if self.stopped or not self.enabled or (self.pid and not process.exited(self.pid)):
                return
            program = shutil.which(self.program)
            if program is None:
                self.enabled = False
                log.warning("spare daemon: program %r not found; daemons start cold", self.program)
                return
            self.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.socket.unlink(missing_ok=True)
            argv = [program, "spare", "--apisock", str(self.socket), "--parent", str(os.getpid())]
            log_file = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log_file = self.log_dir / "spare.out"
                argv += ["--log-file", str(self.log_dir / "spare.log")]
            nice = shutil.which("nice")
            shown = " ".join(argv)
            argv += ["--title-room", "_" * TITLE_ROOM]
            self.pid = process.spawn(([nice, "-n", "19"] if nice else []) + argv, log_file,
                                     what="spare daemon", shown=shown)  # fmt: skip

    def stop(self) -> None:
        """Stop the spare; none is started after this (a start-up still under way included)."""
        with self._lock:
            self.stopped = True
            pid, self.pid = self.pid, 0
        if pid:
            process.terminate(pid, self.socket, grace=2.0, what="spare daemon")
        self.socket.unlink(missing_ok=True)

    def kill_leftovers(self) -> None:
        """Start-up: spares of an earlier snapshotter (killed before it could stop them)."""
        for pid, sock in process.api_socket_processes():
            if sock == self.socket and pid != self.pid:
                log.info("killing the spare daemon of an earlier snapshotter (pid %d)", pid)
                process.kill_now(pid, sock)

    # -- use ---------------------------------------------------------------------------------
    def take(self, argv: Sequence[str], stdout: Path | None) -> int | None:
        """Have the spare become the process of `argv`: its pid, or ``None`` (spawn it cold)."""
        with self._lock:
            pid = self.pid
            if not self.enabled or not pid:
                return None
            answer = self._hand_over(pid, argv, stdout)
            if answer == "ok":
                self.pid = 0
            elif answer is None:  # dead or unreachable: replaced below
                self.pid = 0
                if not process.exited(pid):
                    process.kill_now(pid, self.socket)
                self._note_failure(pid)
        self.start()
        if answer != "ok":
            if answer is not None:
                log.warning("spare daemon refused %s: %s; starting it cold", argv[0], answer)
            return None
        log.info("spare daemon pid %d became: %s", pid, " ".join(argv))
        return pid

    def _hand_over(self, pid: int, argv: Sequence[str], stdout: Path | None) -> str | None:
        request = {"argv": list(argv), "stdout": "" if stdout is None else str(stdout),
                   "priority": os.getpriority(os.PRIO_PROCESS, 0)}  # fmt: skip
        deadline = time.monotonic() + TAKE_WAIT
        while True:
            if process.exited(pid):
                return None
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5.0)
                try:
                    sock.connect(str(self.socket))
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() >= deadline:
                        return None
                    time.sleep(0.005)
                    continue
                try:
                    sock.sendall(json.dumps(request).encode() + b"\n")
                    reply = sock.makefile("rb").readline().decode(errors="replace").strip()
                except OSError as e:
                    log.warning("spare daemon pid %d: %s", pid, e)
                    return None
                return reply or None

    def _note_failure(self, pid: int) -> None:
        self.failures += 1
        status = process.child_status(pid)
        if self.failures >= MAX_FAILURES:
            self.enabled = False
            log.warning("spare daemon (%s) died untaken %d times (last status %s): daemons start cold",
                        self.program, self.failures, status)  # fmt: skip
        else:
            log.info("spare daemon pid %d is gone (status %s); starting another", pid, status)
