"""``nydusd-py spare --apisock S --title-room PAD``: a daemon process started before it is needed.

Starting a daemon costs an interpreter and its imports (pyfuse3, trio, the RAFS reader, the
installed decoders), about half a second of CPU, and a container waits for it in Prepare. A spare
pays that ahead of time: it imports everything, listens on `S`, and waits, niced, so that it
hardly competes with the containers that are starting. The snapshotter then sends it, instead of
spawning a program, the command line it would have run (one JSON line:
``{"argv": [...], "stdout": path, "priority": n}``); the spare answers ``ok``, stops listening,
takes the priority, sends its output to `stdout`, and runs `nydus_fuse.daemon.main.main` with
that command line, exactly as a daemon started cold would.

The daemon is found again after a snapshotter restart by its command line (the API socket
argument, `nydus_core.control.daemons.process`), so the spare rewrites ``/proc/self/cmdline`` to
the command line it took. Linux lets a process do that without privileges only inside its
original argument area; ``--title-room`` reserves that room (a string of padding). A command line
that does not fit is refused (``no room``) and the snapshotter starts that daemon cold.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

from nydus_fuse.holder import listen_private

log = logging.getLogger("nydusd-py")

MAX_REQUEST = 64 << 10
ACCEPT_TIMEOUT = 10.0  # a client that connects and sends nothing does not block the spare for ever
PARENT_CHECK = 0.5  # seconds between checks that the snapshotter that started the spare still runs


class NoRoom(OSError):
    """The command line does not fit in the process's argument area."""


def set_cmdline(args: Sequence[str]) -> None:
    """Make ``/proc/self/cmdline`` read `args` (NUL-separated, padded with NULs)."""
    blob = b"\0".join(os.fsencode(a) for a in args) + b"\0"
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (stat fields 48, 49)
    room = end - start
    if len(blob) > room:
        raise NoRoom(f"command line of {len(blob)} bytes does not fit in {room}")
    # The last byte stays NUL: the kernel then reads the area as separate arguments.
    ctypes.memmove(start, blob + bytes(room - len(blob)), room)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nydusd-py spare", description="a pre-started nydusd-py daemon")
    p.add_argument("--apisock", required=True, help="where the snapshotter hands the spare its command line")
    p.add_argument("--title-room", default="", help="padding: room to rewrite the command line in")
    p.add_argument("--log-file")
    p.add_argument("--parent", type=int, default=0,
                   help="the snapshotter's pid: the spare exits when it is no longer its parent")  # fmt: skip
    return p.parse_args(argv)


def warm_up() -> None:
    """Import what a daemon needs before it serves (what the spare exists to have done)."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import nydus_fuse.daemon.fs
    import nydus_fuse.daemon.supervised  # noqa: F401
    from nydus_core.data import decoders
    from nydus_core.data.rafs import bootstrap  # noqa: F401
    from nydus_core.data.remote import (
        backend,  # noqa: F401
        registry,
    )
    from nydus_core.data.runtime.state import git_commit

    decoders.installed()
    registry.warm_up()
    git_commit()


def _read_request(conn: socket.socket) -> dict[str, object] | None:
    """The request on `conn`; ``None`` for a connection closed without one (a readiness probe)."""
    conn.settimeout(ACCEPT_TIMEOUT)
    data = b""
    while not data.endswith(b"\n"):
        part = conn.recv(4096)
        if not part:
            break
        data += part
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")
    if not data:
        return None
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("request must be a JSON object")
    return doc


def _take(doc: dict[str, object], program: str) -> list[str]:
    """Check a request and become its process (cmdline, output, priority); the daemon's argv.

    Nothing changes unless every step can be done: a refused request leaves a spare."""
    argv = doc.get("argv")
    if not isinstance(argv, list) or len(argv) < 2 or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a list of strings: program, subcommand, flags")
    if os.path.realpath(argv[0]) != os.path.realpath(program):
        raise ValueError(f"argv[0] {argv[0]!r} is not this spare's program {program!r}")
    stdout, priority = doc.get("stdout"), doc.get("priority", 0)
    if not isinstance(priority, int):
        raise ValueError("priority must be an integer")
    fd = -1
    if isinstance(stdout, str) and stdout:
        fd = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        set_cmdline([sys.executable, *argv])
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    if fd >= 0:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, priority)
    return list(argv[1:])


def _unlink_own(path: str, bound: os.stat_result) -> None:
    """Remove the socket at `path` if it is still the one this spare bound.

    A spare may be slow to notice that its snapshotter is gone (it looks every `PARENT_CHECK`,
    niced); by then the next snapshotter's spare can be listening at the same path, and removing
    that one would leave it unreachable."""
    with contextlib.suppress(FileNotFoundError):
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)


def run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    from nydus_fuse.daemon.main import main, setup_logging

    setup_logging("info", args.log_file)
    warm_up()
    try:
        listener = listen_private(args.apisock, backlog=4)
    except OSError as e:
        log.error("spare: cannot listen on %s: %s", args.apisock, e)
        return 1
    bound = os.stat(args.apisock)
    log.info("spare ready on %s", args.apisock)
    program = sys.argv[0]
    # From the command line: the snapshotter may already be gone by the time the imports are done.
    parent = args.parent or os.getppid()
    listener.settimeout(PARENT_CHECK)
    while True:
        if os.getppid() != parent:  # the snapshotter is gone: a spare is of no use to anyone
            log.info("spare: the snapshotter (pid %d) is gone; exiting", parent)
            listener.close()
            _unlink_own(args.apisock, bound)
            return 0
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            try:
                doc = _read_request(conn)
                if doc is None:
                    continue
                daemon_argv = _take(doc, program)
            except (OSError, ValueError) as e:
                log.warning("spare: refused a request: %s", e)
                with contextlib.suppress(OSError):
                    conn.sendall(f"no: {e}\n".encode())
                continue
            conn.sendall(b"ok\n")
        break
    listener.close()
    _unlink_own(args.apisock, bound)
    log.info("spare: becoming %s", " ".join(daemon_argv))
    return main(daemon_argv)
