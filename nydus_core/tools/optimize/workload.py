"""Run a workload once in a container of its own (runc) and record the files it opens.

The container's root is a fresh overlay over the unpacked image (`access_trace` watches that
overlay's superblock; the workload's writes go to a scratch upper layer and are thrown away).
The run ends when the workload exits, when `probe_url` first answers (a server is "ready" at its
first response, so what it opens later is not part of its start-up), or after `period` seconds;
a workload still running then is killed. The container has no network unless `net_host`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from nydus_core.tools.optimize.access_trace import AccessTrace

log = logging.getLogger("nydusify")

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_INTERVAL_S = 0.05
SETTLE_S = 0.2  # after a probe's answer: the response's own opens are still in the queue


class WorkloadError(Exception):
    """The workload could not be run (runc missing, a failed mount, a bad command)."""


@dataclass
class Workload:
    """What to run, as an OCI process: ``args`` (entrypoint + command), environment, cwd, user."""

    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    net_host: bool = False
    period: float = 60.0
    probe_url: str | None = None


@dataclass
class TraceResult:
    paths: list[str]  # absolute paths in the image, first open first
    exit_code: int | None  # None: still running at the end of the period (killed)
    answered: bool  # the probe URL answered
    overflowed: bool  # the kernel dropped events: the list is incomplete
    seconds: float


def _run(*argv: str, timeout: float = 60) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=timeout)
    except FileNotFoundError as e:
        raise WorkloadError(f"{argv[0]} not found: install it (Debian: apt-get install {argv[0]})") from e
    except subprocess.CalledProcessError as e:
        msg = (e.stderr or b"").decode(errors="replace").strip()
        raise WorkloadError(f"{' '.join(argv[:3])} failed: {msg}") from e


def _spec(root: str, wl: Workload, hostname: str) -> dict[str, object]:
    env = list(wl.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not wl.net_host:
        namespaces.append({"type": "network"})
    caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_AUDIT_WRITE",
    ]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
    ]
    if wl.net_host and os.path.exists("/etc/resolv.conf"):
        mounts.append(
            {
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": "/etc/resolv.conf",
                "options": ["rbind", "ro"],
            }
        )
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": wl.uid, "gid": wl.gid},
            "args": wl.args,
            "env": env,
            "cwd": wl.cwd or "/",
            "noNewPrivileges": True,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
        },
        "root": {"path": root, "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


@contextlib.contextmanager
def _overlay(lower: str, work: str) -> Iterator[str]:
    merged = os.path.join(work, "merged")
    for d in ("upper", "ovl-work", "merged"):
        os.makedirs(os.path.join(work, d), exist_ok=True)
    opts = f"lowerdir={lower},upperdir={work}/upper,workdir={work}/ovl-work"
    _run("mount", "-t", "overlay", "overlay", "-o", opts, merged)
    try:
        yield merged
    finally:
        subprocess.run(["umount", merged], capture_output=True, check=False)
        if os.path.ismount(merged):
            subprocess.run(["umount", "-l", merged], capture_output=True, check=False)


def _probe(url: str, answered: threading.Event, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
            answered.set()
            return
        except (urllib.error.URLError, OSError):
            stop.wait(PROBE_INTERVAL_S)


def run_traced(rootfs: str, work: str, wl: Workload, log_path: str) -> TraceResult:
    """Run `wl` on an overlay over the unpacked image `rootfs` (kept unchanged); its output goes
    to `log_path`. See the module docstring."""
    if not wl.args:
        raise WorkloadError("no command to run: the image has no entrypoint or cmd; give --args")
    if shutil.which("runc") is None:
        raise WorkloadError("runc not found: install it (Debian: apt-get install runc)")
    cid = f"nydusify-optimize-{secrets.token_hex(4)}"
    bundle = os.path.join(work, "bundle")
    os.makedirs(bundle, exist_ok=True)
    with _overlay(rootfs, work) as merged:
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(_spec(merged, wl, cid[:20]), f)
        answered, stop = threading.Event(), threading.Event()
        t0 = time.monotonic()
        exit_code: int | None = None
        with AccessTrace(merged) as trace, open(log_path, "ab") as out:
            proc = subprocess.Popen(
                ["runc", "run", "--bundle", bundle, cid], stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
            prober = None
            if wl.probe_url:
                prober = threading.Thread(target=_probe, args=(wl.probe_url, answered, stop), daemon=True)
                prober.start()
            try:
                deadline = t0 + wl.period
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        exit_code = proc.returncode
                        break
                    if answered.is_set():
                        time.sleep(SETTLE_S)
                        break
                    time.sleep(0.02)
            finally:
                stop.set()
                if proc.poll() is None:
                    subprocess.run(["runc", "kill", cid, "KILL"], capture_output=True, check=False)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                subprocess.run(["runc", "delete", "-f", cid], capture_output=True, check=False)
                if prober is not None:
                    prober.join(3)
        seconds = time.monotonic() - t0
    if exit_code is not None and exit_code != 0:
        log.warning("the workload exited with status %d (its output: %s)", exit_code, log_path)
    return TraceResult(trace.paths, exit_code, answered.is_set(), trace.overflowed, seconds)
