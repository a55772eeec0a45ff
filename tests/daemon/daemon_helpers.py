"""Process helpers shared by the daemon tests (a module of its own: `conftest` is not importable)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

from nydus_core.control.daemons.model import DaemonRecord
from nydus_core.control.daemons.nydusd import NydusdBackend
from nydus_core.hookspecs import hookimpl
from nydus_core.records import BackendRecord, Capabilities

MINI = "mini"


class MiniBackend:
    """A plugin with one backend, ``mini``: the core's `NydusdBackend` as it is (upstream's command
    line and API, restart on death, no failover), driving the stand-in ``mini_nydusd.py``."""

    def __init__(self) -> None:
        self.backend = NydusdBackend()

    @hookimpl
    def nydus_backends(self) -> Iterator[BackendRecord]:
        yield BackendRecord(name=MINI, backend=self.backend, capabilities=Capabilities(shared_daemon=True))


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (our test root: only what we started)."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def kill9(pid: int) -> None:
    """SIGKILL a daemon we started and reap it, as a crash would leave it (mounts, socket)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    assert not pid_alive(pid)


class EventRecorder:
    """A plugin that records every `nydus_daemon_event` as (daemon id, event, detail)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    @hookimpl
    def nydus_daemon_event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        self.events.append((daemon.id, event, dict(detail)))

    def names(self, daemon_id: str | None = None) -> list[str]:
        return [e for d, e, _ in self.events if daemon_id is None or d == daemon_id]
