"""Real services for tests, the demo and the benchmarks: docker-registry, containerd, the snapshotter.

Everything here starts genuine processes (no fakes) inside one temporary directory and stops them
again, because the only convincing test of a proxy snapshotter is containerd itself calling it.
The plain classes (`Registry`, `Containerd`, `NydusSnapshotter`, `ServiceStack`,
`build_busybox_image`) have no pytest dependency so `bench/` and `scripts/demo.py` reuse them;
the session-scoped fixtures at the bottom wrap them for pytest.

containerd 1.6 writes a few things under ``/run/containerd`` whatever its config says (shim
sockets, runc state per namespace, ctr fifos). That directory is shared with every other containerd
on the machine, so each `Containerd` uses a namespace unique to this process and removes its tasks
and containers before it stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

__all__ = [
    "BUSYBOX_LAYER2_FILE",
    "BUSYBOX_LAYER2_TEXT",
    "BUSYBOX_LAYER3_FILE",
    "BUSYBOX_LAYER3_TEXT",
    "Containerd",
    "CriSettings",
    "ManagedProcess",
    "NydusSnapshotter",
    "Registry",
    "ServiceError",
    "ServiceStack",
    "build_busybox_image",
    "busybox_image",
    "containerd",
    "free_tcp_port",
    "live_pids_mentioning",
    "nydus_services_dir",
    "nydus_snapshotter",
    "process_alive",
    "pytest_runtest_makereport",
    "registry",
    "snapshotter_executable",
    "unmount_below",
    "wait_until",
]

#: A file that only the second layer of the test image contains, and its exact content.
BUSYBOX_LAYER2_FILE = "/data/layer2.txt"
BUSYBOX_LAYER2_TEXT = "hello from layer2"
#: A file that only the third layer contains; proves the whole chain is stacked in order.
BUSYBOX_LAYER3_FILE = "/etc/layer3.txt"
BUSYBOX_LAYER3_TEXT = "hello from layer3"


class ServiceError(RuntimeError):
    """A service could not be started or did not become ready; the message names its log file."""


def free_tcp_port() -> int:
    """Ask the kernel for a free loopback port (never assume 5000 is free on a shared machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it returns true; raise `ServiceError` naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise ServiceError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _require_tool(name: str) -> str:
    """Return the path of a required binary, or fail with the apt package that provides it."""
    path = shutil.which(name)
    if path is None:
        raise ServiceError(
            f"{name!r} is not on PATH; install it (see README: apt-get install containerd runc "
            "docker-registry skopeo umoci busybox-static)"
        )
    return path


def _tail(path: Path, limit: int = 20000) -> str:
    """The last `limit` characters of a log file, for error messages and failure reports."""
    try:
        data = path.read_text(errors="replace")
    except OSError:
        return ""
    return data[-limit:]


def unmount_below(prefix: Path) -> None:
    """Lazily unmount every mount point under `prefix`, deepest first.

    Safety net for teardown: a crashed test can leave an overlay mounted under a temp dir, and
    `rm -rf` on a mounted overlay would delete the lower layers' files through it.
    """
    base = str(prefix.resolve())
    points: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == base or mnt.startswith(base + "/"):
                points.append(mnt)
    for mnt in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie is dead: its parent may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def live_pids_mentioning(text: str) -> list[int]:
    """Processes (not zombies, not this one) whose command line contains `text` (a test's own
    temp dir: what a teardown must not leave behind)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() not in f.read():
                    continue
        except OSError:
            continue
        if process_alive(int(entry)):
            found.append(int(entry))
    return found


class ManagedProcess:
    """One daemon process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process in its own session so terminal signals aimed at pytest miss it."""
        if self.alive():
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def check_running(self) -> None:
        """Raise with the log tail if the process has already exited (used while waiting for ready)."""
        if self._proc is not None and self._proc.poll() is not None:
            raise ServiceError(
                f"{self.name} exited with code {self._proc.returncode}; log {self.log_path}:\n"
                f"{_tail(self.log_path, 4000)}"
            )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Safe to call twice."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._reap()

    def kill9(self) -> None:
        """SIGKILL without any grace: simulates a crash (no cleanup code runs)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None


class Registry:
    """A docker-registry (distribution 2.8) on a free 127.0.0.1 port, storage under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any] | None = None,
        tls: tuple[Path, Path] | None = None,
    ):
        """`config` is merged into the generated config (e.g. ``auth``, ``proxy``); `tls` is
        ``(certificate, key)`` to serve https."""
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "registry.log"
        self.port = 0
        self.extra_config = dict(config or {})
        self.tls = tls
        self._proc: ManagedProcess | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait for ``GET /v2/`` to answer 200; retries with a new port if one was taken."""
        exe = _require_tool("docker-registry")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for _ in range(3):
            self.port = free_tcp_port()
            config = self.workdir / "config.yml"
            http: dict[str, Any] = {"addr": self.host}
            if self.tls:
                http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
            doc: dict[str, Any] = {
                "version": 0.1,
                "log": {"level": "info"},
                "storage": {"filesystem": {"rootdirectory": str(self.data_dir)}, "delete": {"enabled": True}},
                "http": http,
                **self.extra_config,
            }
            config.write_text(json.dumps(doc, indent=1) + "\n")  # YAML is a superset of JSON
            self._proc = ManagedProcess("docker-registry", [exe, "serve", str(config)], self.log_path)
            self._proc.start()
            try:
                wait_until(self._ready, timeout, f"docker-registry on {self.host} (log {self.log_path})")
                return
            except ServiceError as e:
                last = e
                self._proc.stop()
        raise ServiceError(f"docker-registry did not start: {last}\n{_tail(self.log_path, 4000)}")

    def _ready(self) -> bool:
        assert self._proc is not None
        self._proc.check_running()
        # Readiness only: an auth-protected registry answers 401, a TLS one is probed unverified.
        ctx = ssl._create_unverified_context() if self.tls else None
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=ctx) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError as e:
            return e.code == 401
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()


def build_busybox_image(workdir: Path, registry_host: str, repo: str = "busybox", tag: str = "latest") -> str:
    """Build a 3-layer busybox image offline with umoci and push it with skopeo; return its reference.

    Layer 1: static busybox plus a few applet links and ``/etc/hello.txt``; layer 2: ``/data``
    (`BUSYBOX_LAYER2_FILE` and 1 MiB of random bytes); layer 3: `BUSYBOX_LAYER3_FILE`. Three layers
    give a snapshot chain with two lower directories, which is where overlay mount shapes differ.
    """
    umoci = _require_tool("umoci")
    skopeo = _require_tool("skopeo")
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise ServiceError("/bin/busybox is missing; apt-get install busybox-static")
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "oci"
    image = f"{layout}:{repo}"  # umoci's syntax; skopeo's is oci:<layout>:<tag>

    def run(*argv: str) -> None:
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ServiceError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    run(umoci, "init", "--layout", str(layout))
    run(umoci, "new", "--image", image)
    bundle = workdir / "bundle"
    # Without root umoci cannot chown the unpacked files; --rootless records ownership instead.
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    run(umoci, "unpack", *rootless, "--image", image, str(bundle))
    rootfs = bundle / "rootfs"
    for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "env", "sleep", "true"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "hello.txt").write_text("hello from layer1\n")
    run(umoci, "repack", "--image", image, str(bundle))
    run(umoci, "config", "--image", image, "--config.cmd", "/bin/sh", "--config.env", "PATH=/bin",
        "--architecture", "amd64", "--os", "linux")
    layer2 = workdir / "layer2" / "data"
    layer2.mkdir(parents=True)
    (layer2 / Path(BUSYBOX_LAYER2_FILE).name).write_text(BUSYBOX_LAYER2_TEXT + "\n")
    (layer2 / "random.bin").write_bytes(os.urandom(1 << 20))
    run(umoci, "insert", *rootless, "--image", image, str(layer2), "/data")
    layer3 = workdir / "layer3"
    layer3.mkdir()
    (layer3 / Path(BUSYBOX_LAYER3_FILE).name).write_text(BUSYBOX_LAYER3_TEXT + "\n")
    run(umoci, "insert", *rootless, "--image", image, str(layer3 / Path(BUSYBOX_LAYER3_FILE).name),
        BUSYBOX_LAYER3_FILE)
    run(umoci, "gc", "--layout", str(layout))
    ref = f"{registry_host}/{repo}:{tag}"
    run(skopeo, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image}", f"docker://{ref}")
    return ref


@dataclasses.dataclass(frozen=True)
class CriSettings:
    """Enables containerd's CRI plugin the way a Kubernetes node would use nydus.

    `disable_snapshot_annotations` is CRI's own key; containerd's default is true, which keeps
    the ``containerd.io/snapshot/cri.*`` labels away from the snapshotter.
    `plain_http_registries` are ``host:port`` names CRI reaches over plain HTTP (mirror entries).
    """

    snapshotter: str = "nydus"
    disable_snapshot_annotations: bool = False
    plain_http_registries: tuple[str, ...] = ()


class Containerd:
    """containerd 1.6 with its own root, state and sockets under `workdir`; CRI off unless `cri`.

    `proxy_snapshotters` maps a snapshotter name to the unix socket of a proxy snapshotter; each
    becomes a ``[proxy_plugins.<name>]`` section (containerd dials lazily, so the snapshotter may
    start later). `namespace` is unique per instance unless given (CRI itself always uses
    ``k8s.io``).
    """

    def __init__(self, workdir: Path, proxy_snapshotters: dict[str, Path], namespace: str | None = None,
                 cri: CriSettings | None = None):
        self.cri = cri
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.address = str(workdir / "containerd.sock")
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.proxy_snapshotters = dict(proxy_snapshotters)
        self.namespace = namespace or f"nydus-test-{os.getpid()}-{secrets.token_hex(3)}"
        self._ctr = _require_tool("ctr")
        self._proc: ManagedProcess | None = None
        self._namespaces: set[str] = {self.namespace}

    @property
    def overlayfs_root(self) -> Path:
        """Where containerd's built-in overlayfs snapshotter keeps its snapshots."""
        return self.root / "io.containerd.snapshotter.v1.overlayfs"

    def config_text(self) -> str:
        """The config.toml this instance runs with (printed by the demo as a usable example)."""
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "disabled_plugins = []" if self.cri else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.workdir / "containerd-ttrpc.sock"}"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.workdir / "opt"}"',
            "[proxy_plugins]",
        ]
        for name, sock in self.proxy_snapshotters.items():
            lines += [f"  [proxy_plugins.{name}]", '    type = "snapshot"', f'    address = "{sock}"']
        if self.cri:
            cri = '[plugins."io.containerd.grpc.v1.cri"'
            lines += [
                f"{cri}]",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                f"{cri}.containerd]",
                f'  snapshotter = "{self.cri.snapshotter}"',
                f"  disable_snapshot_annotations = {str(self.cri.disable_snapshot_annotations).lower()}",
                f"{cri}.cni]",  # no CNI config: CRI logs an error, image pulls still work
                '  bin_dir = "/usr/lib/cni"',
                f'  conf_dir = "{self.workdir / "cni-conf"}"',
            ]
            for host in self.cri.plain_http_registries:
                lines += [f'{cri}.registry.mirrors."{host}"]', f'  endpoint = ["http://{host}"]']
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> None:
        exe = _require_tool("containerd")
        _require_tool("runc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.cri:
            (self.workdir / "cni-conf").mkdir(exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._proc = ManagedProcess("containerd", [exe, "--config", str(self.config_path)], self.log_path)
        self._proc.start()

        def ready() -> bool:
            assert self._proc is not None
            self._proc.check_running()
            return self.ctr("version", check=False, timeout=5).returncode == 0

        try:
            wait_until(ready, timeout, f"containerd on {self.address} (log {self.log_path})", interval=0.1)
        except BaseException:
            self._proc.stop()  # never leave a half-started daemon behind a failed fixture
            raise

    def ctr(self, *args: str, check: bool = True, timeout: float = 180.0,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <sock> -n <namespace> <args>``; with `check`, raise with its output."""
        ns = namespace or self.namespace
        self._namespaces.add(ns)
        return self._exec([self._ctr, "--address", self.address, "-n", ns, *args], check, timeout)

    @staticmethod
    def _exec(argv: list[str], check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise ServiceError(
                f"{' '.join(argv)} failed ({proc.returncode}):\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def rpull(self, ref: str, snapshotter: str = "nydus", *, timeout: float = 300.0,
              namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """``ctr-remote image rpull --plain-http --snapshotter <snapshotter> <ref>`` (Debian's
        stargz-snapshotter package), which sends the remote-snapshot labels with every layer's
        Prepare; raises with its output when it fails."""
        ctr_remote = shutil.which("ctr-remote")
        if ctr_remote is None:
            raise ServiceError("ctr-remote missing: apt-get install stargz-snapshotter")
        ns = namespace or self.namespace
        self._namespaces.add(ns)
        return self._exec([ctr_remote, "--address", self.address, "-n", ns, "image", "rpull", "--plain-http",
                           "--snapshotter", snapshotter, ref], True, timeout)

    def channel(self) -> grpc.Channel:
        """A gRPC channel to containerd's own API socket (pair it with `metadata()`)."""
        return grpc.insecure_channel(f"unix://{self.address}")

    def metadata(self, namespace: str | None = None) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata that selects a containerd namespace."""
        ns = namespace or self.namespace
        self._namespaces.add(ns)
        return (("containerd-namespace", ns),)

    def wait_until_reachable(self, snapshotter: str, key: str, namespace: str | None = None,
                             timeout: float = 15.0) -> None:
        """Wait until containerd reaches a (restarted) proxy snapshotter again.

        containerd re-dials a proxy plugin with exponential backoff (capped at 3 s in 1.6), so for
        a moment after the snapshotter restarts every call through containerd fails with
        ``unavailable`` although the new process is serving. ``ctr snapshots info`` on an existing
        `key` is answered by the backend's Stat, so it succeeds only once the link is back.
        """
        def reachable() -> bool:
            return self.ctr("snapshots", "--snapshotter", snapshotter, "info", key,
                            namespace=namespace, check=False, timeout=30).returncode == 0

        wait_until(reachable, timeout, f"containerd to reach snapshotter {snapshotter!r} again", interval=0.2)

    def gc(self, namespace: str | None = None) -> None:
        """Run containerd's garbage collector now and wait for it.

        containerd removes a snapshot from a backend only during GC (``Remove`` through the API
        just drops its metadata); deleting a throw-away lease with ``--sync`` is the one ctr
        command that runs a full collection synchronously.
        """
        lease = f"gc-{secrets.token_hex(4)}"
        self.ctr("leases", "create", "--id", lease, namespace=namespace)
        self.ctr("leases", "delete", "--sync", lease, namespace=namespace)

    def kill_task(self, task: str, namespace: str | None = None, timeout: float = 15.0) -> None:
        """SIGKILL a task and delete it once it has exited (``tasks delete`` fails while it runs)."""
        self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=namespace, check=False, timeout=30)

        def deleted() -> bool:
            done = self.ctr("tasks", "delete", task, namespace=namespace, check=False, timeout=30)
            return done.returncode == 0 or "not found" in done.stderr

        wait_until(deleted, timeout, f"task {task} to exit after SIGKILL", interval=0.1)

    def cleanup_namespace(self, namespace: str) -> None:
        """Kill and delete every task and container of `namespace` (shims outlive containerd otherwise)."""
        tasks = self.ctr("tasks", "ls", "-q", namespace=namespace, check=False, timeout=30)
        for task in tasks.stdout.split():
            with contextlib.suppress(ServiceError):
                self.kill_task(task, namespace=namespace)
        containers = self.ctr("containers", "ls", "-q", namespace=namespace, check=False, timeout=30)
        for c in containers.stdout.split():
            self.ctr("containers", "delete", c, namespace=namespace, check=False, timeout=30)

    def stop(self) -> None:
        """Remove tasks and containers of every namespace used, stop containerd, tidy /run/containerd."""
        if self._proc is not None and self._proc.alive():
            listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=30).stdout.split()
            for ns in sorted(self._namespaces | set(listed)):
                self.cleanup_namespace(ns)
            self._proc.stop()
        for ns in self._namespaces:
            # runc keeps per-namespace state here; other containerds on the machine use other names.
            with contextlib.suppress(OSError):
                (Path("/run/containerd/runc") / ns).rmdir()
        unmount_below(self.workdir)


def grpc_socket_ready(address: Path) -> bool:
    """Whether a gRPC server accepts connections on the unix socket `address` (within a second)."""
    if not address.exists():
        return False
    with grpc.insecure_channel(f"unix://{address}") as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=1)
            return True
        except grpc.FutureTimeoutError:
            return False


#: The nydusd JSON template a user writes for a plain-http registry such as the test registry
#: (``[daemon] nydusd_config``): registry backend, verified chunks, xattrs, no prefetch.
PLAIN_HTTP_NYDUSD_TEMPLATE: dict[str, Any] = {
    "device": {
        "backend": {"type": "registry", "config": {"scheme": "http", "timeout": 10, "retry_limit": 2}},
        "cache": {"type": "blobcache", "config": {"work_dir": ""}},
    },
    "mode": "direct",
    "digest_validate": True,
    "enable_xattr": True,
    "fs_prefetch": {"enable": False},
}


def purge_backends(root: Path) -> None:
    """`Backend.purge` of every installed backend for `root` (errors are printed, not raised)."""
    from nydus_core.plugins import build_plugin_manager

    for name, registered in build_plugin_manager().registry.backends.items():
        try:
            registered.record.backend.purge(Path(root))
        except Exception as e:  # teardown must go on
            print(f"purge of backend {name} for {root} failed: {e}", file=sys.stderr)


def snapshotter_executable() -> str:
    """Locate ``containerd-nydus-grpc``: $NYDUS_SNAPSHOTTER_BIN, next to this Python, then PATH."""
    override = os.environ.get("NYDUS_SNAPSHOTTER_BIN")
    if override:
        return override
    beside = Path(sys.executable).parent / "containerd-nydus-grpc"
    if beside.exists():
        return str(beside)
    found = shutil.which("containerd-nydus-grpc")
    if found is None:
        raise ServiceError("containerd-nydus-grpc not found; run `pip install -e .` in this environment")
    return found


class NydusSnapshotter:
    """``containerd-nydus-grpc`` as a subprocess, with crash (`kill9`) and `restart` helpers."""

    def __init__(self, workdir: Path, address: Path, root: Path | None = None,
                 extra_args: Sequence[str] = (), log_level: str = "debug",
                 env: Mapping[str, str] | None = None, system_address: Path | None = None,
                 config_extra: str = "", executable: str | None = None):
        """`env` is added to this process's environment (e.g. ``DOCKER_CONFIG``); the daemons it
        spawns inherit it (fault injection such as ``NYDUSD_PY_CRASH_ON_READ``).

        `system_address` is where the system controller API listens (default
        ``<workdir>/system.sock``, never the machine-wide ``/run/containerd-nydus``); it goes in a
        small ``--config`` file unless `extra_args` bring their own ``--config``; `config_extra` is
        appended to that file (other sections, e.g. ``[daemon]`` keys that have no flag);
        `executable` is the ``containerd-nydus-grpc`` to run (default: `snapshotter_executable`)."""
        self.executable = executable
        self.config_extra = config_extra
        self.system_address = system_address or workdir / "system.sock"
        self.workdir = workdir
        self.env = dict(env or {})
        self.address = address
        self.root = root or workdir / "root"
        self.log_path = workdir / "snapshotter.log"
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self._proc: ManagedProcess | None = None

    @property
    def snapshots_dir(self) -> Path:
        """The directory holding one sub-directory per snapshot (upstream layout)."""
        return self.root / "snapshots"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def config_path(self) -> Path:
        return self.workdir / "snapshotter-config.toml"

    def argv(self) -> list[str]:
        own_config = [] if "--config" in self.extra_args else ["--config", str(self.config_path)]
        return [
            self.executable or snapshotter_executable(),
            *own_config,
            "--root", str(self.root),
            "--address", str(self.address),
            "--log-level", self.log_level,
            "--log-to-stdout",
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the gRPC socket accepts a connection."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.address.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'version = 1\n\n[system]\nenable = true\naddress = "{self.system_address}"\n\n'
            + self.config_extra
        )
        env = {**os.environ, **self.env} if self.env else None
        self._proc = ManagedProcess("containerd-nydus-grpc", self.argv(), self.log_path, env=env)
        self._proc.start()

        def ready() -> bool:
            assert self._proc is not None
            self._proc.check_running()
            return grpc_socket_ready(self.address)

        try:
            wait_until(ready, timeout, f"containerd-nydus-grpc on {self.address} (log {self.log_path})",
                       interval=0.1)
        except BaseException:
            self._proc.stop()  # never leave a half-started daemon behind a failed fixture
            raise

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()

    def kill9(self) -> None:
        if self._proc is not None:
            self._proc.kill9()

    def purge(self) -> None:
        """End what the installed backends keep running for this root besides their daemons
        (`Backend.purge`: the fusedev session holder, which outlives the snapshotter on purpose).
        For teardown, after the snapshotter and its daemons."""
        purge_backends(self.root)

    def restart(self) -> None:
        """Stop if running (gracefully), then start again with the same root and socket."""
        self.stop()
        self.start()

    def log_tail(self, limit: int = 20000) -> str:
        return _tail(self.log_path, limit)

    def system_put(self, path: str, body: Any, timeout: float = 120.0) -> tuple[int, Any]:
        """``PUT <path>`` on the system controller socket with `body` (JSON-encoded unless bytes).

        Returns the HTTP status and the decoded JSON answer (``None`` when there is none), so a
        test can check error answers as well."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.system_address))
            s.sendall(f"PUT {path} HTTP/1.0\r\nHost: nydus\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        head, _, answer = b"".join(chunks).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        return status, (json.loads(answer) if answer.strip() else None)

    def system_get(self, path: str, timeout: float = 10.0) -> Any:
        """``GET <path>`` on the system controller socket; the decoded JSON (raises on non-200)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.system_address))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: nydus\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1].decode() if head else "?"
        if status != "200":
            text = body.decode(errors="replace")
            raise ServiceError(f"system controller GET {path}: HTTP {status}: {text}")
        return json.loads(body)


class ServiceStack:
    """containerd + the nydus snapshotter (+ optionally a registry) in one temp dir; a context manager.

    Used by the demo and the benchmark; everything is stopped and unmounted on exit, even after
    an error. Pass `keep=True` to leave the directory (logs) in place for inspection.
    """

    def __init__(self, with_registry: bool = False, with_snapshotter: bool = True, keep: bool = False,
                 snapshotter_args: Sequence[str] = ()):
        self.with_registry = with_registry
        self.with_snapshotter = with_snapshotter
        self.keep = keep
        self.snapshotter_args = list(snapshotter_args)
        self.workdir = Path(tempfile.mkdtemp(prefix="nydus-stack-"))
        self.registry: Registry | None = None
        self.snapshotter: NydusSnapshotter | None = None
        self.containerd: Containerd | None = None

    def __enter__(self) -> ServiceStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        sock = self.workdir / "nydus" / "nydus.sock"
        if self.with_registry:
            self.registry = Registry(self.workdir / "registry")
            self.registry.start()
        self.containerd = Containerd(self.workdir / "containerd", {"nydus": sock})
        self.containerd.start()
        if self.with_snapshotter:
            self.snapshotter = NydusSnapshotter(self.workdir / "nydus", sock,
                                                extra_args=self.snapshotter_args)
            self.snapshotter.start()

    def stop(self) -> None:
        """Stop in reverse order of dependency; each step runs even if an earlier one failed."""
        steps: list[Callable[[], None]] = []
        if self.containerd is not None:
            steps.append(self.containerd.stop)
        if self.snapshotter is not None:
            steps += [self.snapshotter.stop, self.snapshotter.purge]
        if self.registry is not None:
            steps.append(self.registry.stop)
        for step in steps:
            try:
                step()
            except Exception as e:  # teardown must go on
                print(f"teardown step {step!r} failed: {e}", file=sys.stderr)
        unmount_below(self.workdir)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# pytest fixtures (session scope: one registry, one containerd, one snapshotter per session)
# --------------------------------------------------------------------------------------------

def _need_root() -> None:
    """Skip only for lack of root; missing tools are a failure (CI must install them).

    containerd, runc and overlay mounts need root; the registry and the test image do not.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: containerd, runc and overlay mounts only work as root")


@pytest.fixture(scope="session")
def nydus_services_dir() -> Iterator[Path]:
    """A short temp dir for the session's services (unix socket paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="nydus-it-"))
    yield d
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(nydus_services_dir: Path) -> Iterator[Registry]:
    """A running docker-registry on a free 127.0.0.1 port.

    Attributes: ``.host``, ``.url``, ``.log_path``, ``.data_dir``.
    """
    reg = Registry(nydus_services_dir / "registry")
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def busybox_image(registry: Registry, nydus_services_dir: Path) -> str:
    """Reference of a 3-layer busybox image pushed to `registry` (see `build_busybox_image`)."""
    return build_busybox_image(nydus_services_dir / "image", registry.host)


def _nydus_socket(services_dir: Path) -> Path:
    return services_dir / "nydus" / "nydus.sock"


@pytest.fixture(scope="session")
def containerd(nydus_services_dir: Path) -> Iterator[Containerd]:
    """containerd 1.6 with ``[proxy_plugins.nydus]`` pointing at the session's snapshotter socket."""
    _need_root()
    ctrd = Containerd(nydus_services_dir / "containerd", {"nydus": _nydus_socket(nydus_services_dir)})
    ctrd.start()
    yield ctrd
    ctrd.stop()


@pytest.fixture(scope="session")
def nydus_snapshotter(nydus_services_dir: Path) -> Iterator[NydusSnapshotter]:
    """``containerd-nydus-grpc`` serving the socket the `containerd` fixture is configured with."""
    _need_root()
    snap = NydusSnapshotter(nydus_services_dir / "nydus", _nydus_socket(nydus_services_dir))
    snap.start()
    yield snap
    snap.stop()


_LOGGED_FIXTURES = {
    "nydus_snapshotter": "nydus snapshotter log",
    "containerd": "containerd log",
    "registry": "docker-registry log",
}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed test that used a service fixture, attach the tail of that service's log."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name, title in _LOGGED_FIXTURES.items():
            log_path = getattr(funcargs.get(name), "log_path", None)
            if isinstance(log_path, Path):
                report.sections.append((title, _tail(log_path, 6000)))
    return report
