"""One benchmark sample from a clean state: pull, create, run until ready; bytes off the registry.

Every sample gets a brand-new containerd and (for nydus) a brand-new ``containerd-nydus-grpc``
with its own root in a fresh temp dir, so no content store, snapshot, blob cache or daemon
survives from the previous sample; the page cache is dropped before it starts. The timed part
starts at the pull: starting the daemons is not part of a container's startup on a real node.

The Go stargz-snapshotter (``containerd-stargz-grpc``, the peer) is started the same way, fresh
for every sample, as containerd's proxy plugin ``stargz``; ``SIGINT`` at the end makes it unmount
its FUSE layers and remove its snapshots, and whatever is still mounted below the sample's
directory is unmounted before it is deleted.

Phases (HelloBench's): *pull* = ``ctr image pull`` (OCI: download + unpack) or ``ctr-remote image
rpull`` (lazy formats: manifest + metadata only; for eStargz also each layer's TOC, which the
snapshotter fetches while the layer's snapshot is prepared); *create* = ``ctr container create``
(snapshot Prepare; for nydus this mounts the image through a daemon); *run* = ``ctr task start``
until the workload is ready (its exit with the expected output, or its first HTTP response).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from nydus_core.testing.debian_image import CACHE_DIR
from nydus_core.testing.proxy import Fault, FaultyProxy
from nydus_core.testing.services import (
    Containerd,
    ManagedProcess,
    NydusSnapshotter,
    ServiceError,
    free_tcp_port,
    grpc_socket_ready,
    unmount_below,
    wait_until,
)

NYDUSD_PY = str(Path(sys.executable).with_name("nydusd-py"))

#: Where ``bench/peers/stargz-grpc/build.sh`` is told to put the peer (``PEER_BIN=...``).
PEER_BIN_DIR = CACHE_DIR / "peer-bin"
PEER_BUILD_HINT = (f"build it with `make peer` (PEER_BIN={PEER_BIN_DIR} bash "
                   "bench/peers/stargz-grpc/build.sh) or point $STARGZ_GRPC_BIN at a containerd-stargz-grpc")
#: Our snapshotter's config for the eStargz modes (upstream's key; `--enable-stargz` sets it too).
ENABLE_STARGZ_TOML = "[experimental]\nenable_stargz = true\n"


def peer_binary() -> str | None:
    """``containerd-stargz-grpc``: $STARGZ_GRPC_BIN, then `PEER_BIN_DIR`, then PATH; None if absent."""
    override = os.environ.get("STARGZ_GRPC_BIN")
    if override:
        return override if os.access(override, os.X_OK) else None
    built = PEER_BIN_DIR / "containerd-stargz-grpc"
    if os.access(built, os.X_OK):
        return str(built)
    return shutil.which("containerd-stargz-grpc")


class BenchError(RuntimeError):
    """A sample could not be measured (the workload failed, a tool is missing, a bad flag)."""


# ------------------------------------------------------------------------------------ snapshotters


@attrs.frozen
class SnapshotterSpec:
    """How to pull and run one image format: a containerd snapshotter name, a format, a pull tool.

    `socket` names an external proxy snapshotter already running on the machine (added to each
    sample's containerd as ``[proxy_plugins.<name>]``; its own state is not wiped between
    samples); `ours` starts our ``containerd-nydus-grpc`` fresh for every sample (with
    `stargz`, its eStargz support switched on), `peer` the Go ``containerd-stargz-grpc``.
    `fmt` picks the image reference (`images.BuiltImage.ref_for`): ``oci``, ``nydus``,
    ``estargz`` (unoptimized) or ``estargz-opt`` (optimized for the sample's workload).
    `label` is the mode's name in records and tables.
    """

    name: str
    fmt: str
    pull: str = "ctr"  # "ctr": ctr image pull (full); "rpull": ctr-remote image rpull (lazy)
    socket: Path | None = None
    ours: bool = False
    peer: bool = False
    stargz: bool = False
    label: str | None = None
    #: ours only: extra snapshotter TOML, and nydusd JSON keys over the template.
    toml: str = ""
    nydusd_keys: tuple[tuple[str, Any], ...] = ()

    @property
    def mode(self) -> str:
        if self.label:
            return self.label
        return self.name if self.ours or self.socket else f"{self.fmt}/{self.name}"


#: The nydus-opt mode's ``fs_prefetch``: the prefetch table only, in 1 MiB windows, 8 at a time.
OPT_PREFETCH = {"enable": True, "prefetch_all": False, "threads_count": 8, "merging_size": 1 << 20}

BUILTIN_SNAPSHOTTERS = {
    "overlayfs": SnapshotterSpec("overlayfs", "oci", "ctr"),
    "nydus": SnapshotterSpec("nydus", "nydus", "rpull", ours=True, toml="[daemon]\nspare_daemon = true\n"),
    # Ours as it was before the start-up levers of issue 16: every daemon a cold interpreter
    # (no spare) and a miss amplified over 1 MiB of blind neighbours (not bounded by the file).
    "nydus-before": SnapshotterSpec("nydus", "nydus", "rpull", ours=True, label="nydus-before",
                                    toml="[daemon]\nspare_daemon = false\n",
                                    nydusd_keys=(("amplify_across_files", 1 << 20),)),
    # Ours on the image `nydusify optimize` laid out for the sample's workload, with fs_prefetch of
    # its prefetch table (not the rest: prefetch_all off), as the peer prefetches its landmark files.
    "nydus-opt": SnapshotterSpec("nydus", "nydus-opt", "rpull", ours=True, label="nydus-opt",
                                 toml="[daemon]\nspare_daemon = true\n",
                                 nydusd_keys=(("fs_prefetch", OPT_PREFETCH),)),
    # The Go stargz-snapshotter on the unoptimized and the workload-optimized eStargz image.
    "stargz-go": SnapshotterSpec("stargz", "estargz", "rpull", peer=True, label="stargz-go"),
    "stargz-go-opt": SnapshotterSpec("stargz", "estargz-opt", "rpull", peer=True, label="stargz-go-opt"),
    # Ours ([experimental] enable_stargz = true) on the very same eStargz references.
    "nydus-estargz": SnapshotterSpec("nydus", "estargz", "rpull", ours=True, stargz=True,
                                     label="nydus-estargz", toml="[daemon]\nspare_daemon = true\n"),
    "nydus-estargz-opt": SnapshotterSpec("nydus", "estargz-opt", "rpull", ours=True, stargz=True,
                                         label="nydus-estargz-opt", toml="[daemon]\nspare_daemon = true\n"),
}
#: The peer's modes, in `default_snapshotters` when its binary exists.
PEER_MODES = ("stargz-go", "stargz-go-opt")


def default_snapshotters() -> tuple[list[SnapshotterSpec], str | None]:
    """overlayfs and nydus, plus the Go peer's modes when `peer_binary` finds it; and a one-line
    note saying why the peer is left out (``None`` when it is in)."""
    specs = [BUILTIN_SNAPSHOTTERS["overlayfs"], BUILTIN_SNAPSHOTTERS["nydus"]]
    if peer_binary() is None:
        modes = "/".join(PEER_MODES)
        return specs, f"bench: no containerd-stargz-grpc, so no {modes} modes: {PEER_BUILD_HINT}"
    return specs + [BUILTIN_SNAPSHOTTERS[m] for m in PEER_MODES], None


def parse_snapshotter(text: str) -> SnapshotterSpec:
    """A built-in mode name (`BUILTIN_SNAPSHOTTERS`), or
    ``name=<n>,socket=<path>,format=<fmt>[,pull=rpull|ctr]``."""
    if "=" not in text:
        try:
            spec = BUILTIN_SNAPSHOTTERS[text]
        except KeyError:
            raise BenchError(f"unknown snapshotter {text!r}: use one of {sorted(BUILTIN_SNAPSHOTTERS)} "
                             "or name=<n>,socket=<path>,format=<fmt>[,pull=rpull]") from None
        if spec.peer and peer_binary() is None:
            raise BenchError(f"snapshotter {text!r} needs containerd-stargz-grpc: {PEER_BUILD_HINT}")
        return spec
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    missing = {"name", "socket", "format"} - fields.keys()
    if missing:
        raise BenchError(f"snapshotter {text!r} lacks {', '.join(sorted(missing))}")
    pull = fields.get("pull", "rpull")
    if pull not in ("ctr", "rpull"):
        raise BenchError(f"snapshotter {text!r}: pull must be ctr or rpull, not {pull!r}")
    sock = Path(fields["socket"])
    if not sock.exists():
        raise BenchError(f"snapshotter {fields['name']!r}: socket {sock} does not exist (is it running?)")
    return SnapshotterSpec(fields["name"], fields["format"], pull, sock)


# ------------------------------------------------------------------------------------ workloads


@attrs.frozen
class Workload:
    """A command in an image and its notion of ready: ``exit`` (status 0, `expect` in stdout) or
    ``http`` (first HTTP response on ``{port}``, which is substituted in `argv`)."""

    name: str
    image: str
    argv: tuple[str, ...]
    ready: str = "exit"
    expect: str = "ready"


HELLO_C = (r'#include <stdio.h>\nint main(void){char b[64];'
           r'if(fgets(b,sizeof b,stdin))fputs(b,stdout);return 0;}\n')

WORKLOADS = {
    w.name: w for w in (
        Workload("busybox-cat", "busybox", ("sh", "-c", "cat /etc/hello.txt && echo ready")),
        Workload("python-import", "python", ("python3", "-c", 'import json, sqlite3; print("ready")')),
        Workload("python-http", "python", ("python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"),
                 ready="http", expect=""),
        Workload("python-tar-usr", "python", ("sh", "-c", "tar -cf - /usr 2>/dev/null | wc -c"), expect=""),
        Workload("python-big-import", "python-big",
                 ("python3", "-c", 'import numpy, pandas; print("ready")')),
        Workload("gcc-hello", "gcc", ("sh", "-c", f"printf '{HELLO_C}' | gcc -x c -o /tmp/hello - && "
                                      "echo ready | /tmp/hello")),
    )
}


# ------------------------------------------------------------------------------------ sandbox


def drop_page_cache() -> None:
    """``sync; echo 3 > drop_caches``: the registry and the runtime read from disk, as after a boot."""
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of `pid` (children not included), 0 when it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (our daemons, found by their unique root)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


#: The peer's config file: its defaults (prefetch and background fetch on; localhost and 127.0.0.1
#: registries over plain http), written out so a sample's log shows what it ran with.
PEER_CONFIG_TOML = """\
# containerd-stargz-grpc (stargz-snapshotter 0.12) with its defaults: prefetch on
# (noprefetch = false), background fetch on (no_background_fetch = false), no
# [resolver] entries (localhost / 127.0.0.1 registries are plain http).
"""


class StargzPeer:
    """``containerd-stargz-grpc --address <sock> --root <dir> --config <toml>`` in `workdir`."""

    def __init__(self, workdir: Path, executable: str, log_level: str = "info") -> None:
        self.workdir = workdir
        self.executable = executable
        self.address = workdir / "stargz.sock"
        self.root = workdir / "root"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "stargz-grpc.log"
        self.log_level = log_level
        self._proc: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until its gRPC socket accepts a connection."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(PEER_CONFIG_TOML)
        self._proc = ManagedProcess("containerd-stargz-grpc", [
            self.executable, "--address", str(self.address), "--root", str(self.root),
            "--config", str(self.config_path), "--log-level", self.log_level], self.log_path)
        self._proc.start()

        def ready() -> bool:
            assert self._proc is not None
            self._proc.check_running()
            return grpc_socket_ready(self.address)

        try:
            wait_until(ready, timeout, f"containerd-stargz-grpc on {self.address} (log {self.log_path})",
                       interval=0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT (it unmounts its FUSE layers and removes its snapshots), SIGTERM/SIGKILL after
        `timeout`; then anything still mounted under its root is unmounted."""
        proc = self._proc
        if proc is not None and proc.pid is not None and proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            deadline = time.monotonic() + timeout
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if proc is not None:
            proc.stop()
        self._proc = None
        unmount_below(self.workdir)


class Sandbox:
    """A fresh containerd (+ our snapshotter when `spec.ours`, the Go peer when `spec.peer`) in a
    new temp dir; all gone on exit."""

    def __init__(self, spec: SnapshotterSpec, nydusd_config: dict[str, Any]) -> None:
        self.spec = spec
        self.workdir = Path(tempfile.mkdtemp(prefix="nydus-bench-"))  # short: unix socket paths
        sockets: dict[str, Path] = {}
        self.snapshotter: NydusSnapshotter | None = None
        self.peer: StargzPeer | None = None
        if spec.ours:
            sock = self.workdir / "nydus" / "nydus.sock"
            template = self.workdir / "nydusd-config.json"
            if spec.stargz:
                # As the peer does by default: the files before .prefetch.landmark (the bootstrap's
                # prefetch table) are fetched as soon as the layer is mounted, nothing else.
                nydusd_config = {**nydusd_config,
                                 "fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": 8}}
            nydusd_config = {**nydusd_config, **dict(spec.nydusd_keys)}
            template.write_text(json.dumps(nydusd_config, indent=2))
            self.snapshotter = NydusSnapshotter(
                self.workdir / "nydus", sock, log_level="info",
                extra_args=["--daemon-mode", "dedicated", "--nydusd-path", NYDUSD_PY,
                            "--nydusd-config", str(template)],
                config_extra=(ENABLE_STARGZ_TOML if spec.stargz else "") + spec.toml)
            sockets[spec.name] = sock
        elif spec.peer:
            exe = peer_binary()
            if exe is None:
                raise BenchError(f"mode {spec.mode} needs containerd-stargz-grpc: {PEER_BUILD_HINT}")
            self.peer = StargzPeer(self.workdir / "stargz", exe)
            sockets[spec.name] = self.peer.address
        elif spec.socket is not None:
            sockets[spec.name] = spec.socket
        self.containerd = Containerd(self.workdir / "containerd", sockets,
                                     namespace=f"bench-{secrets.token_hex(3)}")

    def __enter__(self) -> Sandbox:
        try:
            # The snapshotter first: containerd's first dial of a missing socket backs off for seconds.
            if self.snapshotter is not None:
                self.snapshotter.start()
            if self.peer is not None:
                self.peer.start()
            self.containerd.start()
            if self.snapshotter is not None and "spare_daemon = true" in self.spec.toml:
                # a node's snapshotter has its spare daemon waiting
                spare = self.snapshotter.root / "spare" / "api.sock"
                wait_until(spare.exists, 30, f"the spare daemon at {spare}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def daemon_pids(self) -> list[int]:
        """The nydusd-py daemons our snapshotter started for this sandbox (their args name our root)."""
        if self.snapshotter is None:
            return []
        return [p for p in _pids_mentioning(str(self.snapshotter.root)) if p != self.snapshotter.pid]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of containerd, the snapshotter and its daemons, or the peer (all its
        threads: it serves FUSE in-process), not the shims or the workload."""
        out = {"containerd": cpu_seconds(self.containerd._proc.pid if self.containerd._proc else None)}
        if self.snapshotter is not None:
            out["snapshotter"] = cpu_seconds(self.snapshotter.pid)
            out["nydusd"] = sum(cpu_seconds(p) for p in self.daemon_pids())
        if self.peer is not None:
            out["stargz-grpc"] = cpu_seconds(self.peer.pid)
        return out

    def stop(self) -> None:
        """containerd first (containers read through the daemons), then the snapshotter, then daemons."""
        try:
            self.containerd.stop()
        except Exception as e:  # teardown goes on
            print(f"bench: containerd stop failed: {e}", file=sys.stderr)
        daemons = self.daemon_pids()
        if self.snapshotter is not None:
            self.snapshotter.stop()
        if self.peer is not None:
            try:
                self.peer.stop()
            except Exception as e:  # teardown goes on
                print(f"bench: containerd-stargz-grpc stop failed: {e}", file=sys.stderr)
        for pid in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while daemons and time.monotonic() < deadline:
            daemons = [p for p in daemons if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.05)
        for pid in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_below(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------ phases


def _pull(sb: Sandbox, ref: str) -> None:
    if sb.spec.pull == "rpull":
        ctr_remote = shutil.which("ctr-remote")
        if ctr_remote is None:
            raise BenchError("ctr-remote missing: apt-get install stargz-snapshotter")
        proc = subprocess.run([ctr_remote, "--address", sb.containerd.address, "-n", sb.containerd.namespace,
                               "image", "rpull", "--plain-http", "--snapshotter", sb.spec.name, ref],
                              capture_output=True, text=True, timeout=900, check=False,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise BenchError(f"rpull {ref} failed: {proc.stderr[-2000:]}")
    else:
        sb.containerd.ctr("image", "pull", "--plain-http", "--snapshotter", sb.spec.name, ref, timeout=900)


def _create(sb: Sandbox, ref: str, cid: str, argv: list[str]) -> None:
    # Flags in the --name=value form, then "--": ctr's argument reordering otherwise takes a
    # workload's "-c" for its own --config flag.
    sb.containerd.ctr("container", "create", f"--snapshotter={sb.spec.name}", "--net-host=true", "--",
                      ref, cid, *argv, timeout=600)


def _run_until_ready(sb: Sandbox, wl: Workload, cid: str, port: int) -> str:
    """Start the task and return once `wl` is ready; the workload's stdout (exit workloads)."""
    if wl.ready == "exit":
        proc = sb.containerd.ctr("task", "start", cid, check=False, timeout=900)
        if proc.returncode != 0 or wl.expect not in proc.stdout or not proc.stdout.strip():
            raise BenchError(f"{wl.name}: exit {proc.returncode}, stdout {proc.stdout[-500:]!r}, "
                             f"stderr {proc.stderr[-1500:]!r}")
        return proc.stdout
    argv = ["ctr", "--address", sb.containerd.address, "-n", sb.containerd.namespace, "task", "start", cid]
    task = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def answered() -> bool:
        if task.poll() is not None:
            err = task.stderr.read().decode(errors="replace") if task.stderr else ""
            raise BenchError(f"{wl.name}: task exited ({task.returncode}) before answering: {err[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                return int(resp.status) < 500
        except OSError:
            return False

    try:
        wait_until(answered, 600, f"{wl.name} to answer on port {port}", interval=0.02)
    finally:
        with contextlib.suppress(ServiceError):
            sb.containerd.kill_task(cid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            task.wait(10)
        if task.poll() is None:
            task.kill()
            task.wait()
        if task.stderr:
            task.stderr.close()
    return ""


@contextlib.contextmanager
def proxy_rtt(proxy: FaultyProxy, rtt_ms: float) -> Iterator[None]:
    """Every request through `proxy` waits `rtt_ms` before it is forwarded (one round trip each)."""
    if rtt_ms <= 0:
        yield
        return
    with proxy.fault("delay", seconds=rtt_ms / 1000.0):
        yield


def via_proxy(ref: str, proxy: FaultyProxy) -> str:
    """The same repository and tag, reached through the counting proxy."""
    return f"{proxy.host}/{ref.split('/', 1)[1]}"


def run_sample(spec: SnapshotterSpec, ref: str, wl: Workload, proxy: FaultyProxy,
               nydusd_config: dict[str, Any], warm_rerun: bool = False) -> dict[str, Any]:
    """One clean-state sample; `ref` must already name the proxy. Returns the JSON-line record.

    With `warm_rerun` a second container of the same image is created and run afterwards (image
    pulled, page cache warm) and its create+run time recorded as ``warm_s``: the local floor.
    """
    drop_page_cache()
    with Sandbox(spec, nydusd_config) as sb:
        proxy.reset_requests()
        port = free_tcp_port()
        argv = [a.replace("{port}", str(port)) for a in wl.argv]
        cid = f"bench-{secrets.token_hex(4)}"
        cpu0 = sb.cpu()
        t0 = time.monotonic()
        _pull(sb, ref)
        t1 = time.monotonic()
        _create(sb, ref, cid, argv)
        t2 = time.monotonic()
        out = _run_until_ready(sb, wl, cid, port)
        t3 = time.monotonic()
        cpu1 = sb.cpu()
        seen = proxy.requests
        record: dict[str, Any] = {
            "pull_s": t1 - t0, "create_s": t2 - t1, "run_s": t3 - t2, "e2e_s": t3 - t0,
            "bytes": sum(r.body_bytes for r in seen), "requests": len(seen),
            "ranged_bytes": sum(r.body_bytes for r in seen if r.range),
            "ranged_requests": sum(1 for r in seen if r.range),
            "cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1},
            "output": out.strip()[-200:],
        }
        if warm_rerun:
            cid2 = f"bench-{secrets.token_hex(4)}"
            port2 = free_tcp_port()
            argv2 = [a.replace("{port}", str(port2)) for a in wl.argv]
            t4 = time.monotonic()
            _create(sb, ref, cid2, argv2)
            _run_until_ready(sb, wl, cid2, port2)
            record["warm_s"] = time.monotonic() - t4
        return record


def trace_needed(spec_lazy: SnapshotterSpec, lazy_ref: str, oci_ref: str, wl: Workload, proxy: FaultyProxy,
                 nydusd_config: dict[str, Any]) -> dict[str, float]:
    """What the physical limit needs for `wl`, measured once on an unshaped network.

    ``needed_bytes``: the data the workload really reads, as the lazy format's compressed chunks
    served by byte range with read amplification off (so nothing it did not read is counted).
    ``warm_s``: create + run of a second container from an already pulled OCI image (warm page
    cache): what the workload costs with no network at all.
    """
    exact = dict(nydusd_config, amplify_io=0)
    lazy = run_sample(spec_lazy, lazy_ref, wl, proxy, exact)
    oci = run_sample(BUILTIN_SNAPSHOTTERS["overlayfs"], oci_ref, wl, proxy, nydusd_config, warm_rerun=True)
    return {"needed_bytes": float(lazy["ranged_bytes"]), "warm_s": float(oci["warm_s"])}


def nydusd_template(amplify_io: int) -> dict[str, Any]:
    """The per-image daemon config our snapshotter fills in: registry backend, blob cache, no prefetch."""
    return {
        "device": {
            "backend": {"type": "registry",
                        "config": {"scheme": "http", "timeout": 30, "connect_timeout": 5, "retry_limit": 2}},
            "cache": {"type": "blobcache", "config": {"work_dir": ""}},
        },
        "mode": "direct",
        "digest_validate": False,
        "enable_xattr": True,
        "amplify_io": amplify_io,
        "fs_prefetch": {"enable": False},
    }


__all__ = [
    "BUILTIN_SNAPSHOTTERS", "PEER_BUILD_HINT", "PEER_MODES", "WORKLOADS", "BenchError", "Fault", "Sandbox",
    "SnapshotterSpec", "StargzPeer", "Workload", "default_snapshotters", "nydusd_template",
    "parse_snapshotter", "peer_binary", "proxy_rtt", "run_sample", "trace_needed", "via_proxy",
]
