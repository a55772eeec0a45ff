"""The stack of the remote end-to-end tests: containerd 1.6, ``containerd-nydus-grpc``, ``nydusd-py``.

`Stack` owns one containerd whose ``nydus`` proxy plugin dials a fixed socket; each scenario
(`Stack.scenario`) starts a fresh snapshotter on that socket with its own root (so its own blob
cache), nydusd JSON template, ``config.toml`` and environment (``DOCKER_CONFIG``), pulls the image
with ``ctr-remote image rpull --snapshotter nydus`` and runs containers with ``ctr run``. At the
end of a scenario the images are removed through containerd (which removes the snapshots and so
stops the daemons), and anything left of that root (a daemon, a mount) is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from remote_helpers import PASSWORD, USER  # on sys.path through conftest (tests/remote)

from nydus_core.testing.services import Containerd, NydusSnapshotter, ServiceError, unmount_below, wait_until

NYDUSIFY = str(Path(sys.executable).parent / "nydusify")
NYDUSD = str(Path(sys.executable).parent / "nydusd-py")
CTR_REMOTE = shutil.which("ctr-remote") or "ctr-remote"
CHUNK_SIZE = "0x40000"  # 256 KiB: the 1 MiB /data/random.bin spans four chunks
RUN_TIMEOUT = 90.0
NYDUS_TAG = "nydus-e2e"


def nydusify(*args: str, env: Mapping[str, str] | None = None) -> None:
    """Run ``nydusify``; raise with its output when it fails."""
    proc = subprocess.run([NYDUSIFY, *args], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise ServiceError(f"nydusify {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")


def convert(source: str, target: str, *target_flags: str, env: Mapping[str, str] | None = None) -> str:
    """Convert busybox `source` into the nydus image `target`; return `target`.

    `target_flags`: ``--plain-http`` (both registries plain http) or ``--source-insecure
    --target-insecure`` (an https target whose CA nydusify does not know).
    """
    nydusify("convert", "--source", source, "--target", target, "--chunk-size", CHUNK_SIZE, *target_flags,
             env=env)  # fmt: skip
    return target


def push_nydus(busybox_image: str, registry_host: str, tmp: Path, *flags: str) -> str:
    """Convert busybox into the registry at `registry_host` (credentials through a docker config)."""
    env = {"DOCKER_CONFIG": str(docker_config(tmp, registry_host, USER, PASSWORD))}
    target = f"{registry_host}/busybox:{NYDUS_TAG}"
    return convert(busybox_image, target, *(flags or ("--plain-http",)), env=env)


def source_file(registry_url: str, ref: str, path: str) -> bytes:
    """The bytes of `path` in the OCI image `ref` (plain registry), read straight from its layers."""
    repo, _, tag = ref.split("/", 1)[1].rpartition(":")

    def get(url: str, accept: str = "") -> bytes:
        req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: bytes = resp.read()
            return data

    manifest = json.loads(get(f"{registry_url}/v2/{repo}/manifests/{tag}",
                              "application/vnd.oci.image.manifest.v1+json"))  # fmt: skip
    found: bytes | None = None
    for layer in manifest["layers"]:
        tar = gzip.decompress(get(f"{registry_url}/v2/{repo}/blobs/{layer['digest']}"))
        # umoci writes tars without the end-of-archive blocks: stream them and stop at the end.
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r|") as tf, contextlib.suppress(tarfile.ReadError):
            for member in tf:
                if member.name.lstrip("./") == path.lstrip("/") and member.isfile():
                    f = tf.extractfile(member)
                    assert f is not None
                    found = f.read()
    if found is None:
        raise AssertionError(f"{path} is not in {ref}")
    return found


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A ``DOCKER_CONFIG`` directory holding credentials for `host`."""
    import base64

    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def template(scheme: str, **backend: Any) -> dict[str, Any]:
    """A nydusd JSON template (``[daemon] nydusd_config``): prefetch off so reads happen on demand,
    one retry so a refused request fails fast."""
    return {
        "device": {
            "backend": {"type": "registry",
                        "config": {"scheme": scheme, "timeout": 5, "connect_timeout": 3, "retry_limit": 1,
                                   **backend}},
            "cache": {"type": "blobcache", "config": {"work_dir": ""}},
        },
        "mode": "direct",
        "digest_validate": True,
        "enable_xattr": True,
        "amplify_io": 0,
        "fs_prefetch": {"enable": False},
    }


def _pids_using(root: Path) -> list[int]:
    """Processes whose command line names a path under `root` (the daemons a snapshotter started)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd and "nydusd" in cmd:
            out.append(int(p.name))
    return out


class Scenario:
    """One snapshotter configuration, its namespace in containerd, and helpers to pull and run."""

    def __init__(self, stack: Stack, name: str, snapshotter: NydusSnapshotter, ns: str) -> None:
        self.stack = stack
        self.name = name
        self.snapshotter = snapshotter
        self.ns = ns
        self.refs: list[str] = []
        self.containers: list[str] = []

    @property
    def root(self) -> Path:
        return self.snapshotter.root

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def rpull(self, ref: str, *flags: str) -> None:
        """``ctr-remote image rpull --snapshotter nydus`` (containerd fetches manifest and bootstrap)."""
        self.refs.append(ref)
        proc = subprocess.run([CTR_REMOTE, "--address", self.stack.containerd.address, "-n", self.ns, "image",
                               "rpull", "--snapshotter", "nydus", *flags, ref],
                              capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL)  # fmt: skip
        if proc.returncode != 0:
            tail = self.snapshotter.log_tail(4000)
            raise ServiceError(f"rpull {ref} failed:\n{proc.stdout}{proc.stderr}\n{tail}")

    def run(self, ref: str, *cmd: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm --snapshotter nydus <ref> <id> <cmd>`` (not checked)."""
        cid = f"{self.name}-{len(self.containers)}"
        self.containers.append(cid)
        return self.stack.containerd.ctr("run", "--rm", "--snapshotter", "nydus", ref, cid, *cmd,
                                         check=False, timeout=timeout, namespace=self.ns)  # fmt: skip

    def start(self, ref: str) -> str:
        """A detached container that sleeps, to exec reads in while the test changes the world."""
        cid = f"{self.name}-{len(self.containers)}"
        self.containers.append(cid)
        self.stack.containerd.ctr("run", "-d", "--snapshotter", "nydus", ref, cid, "sleep", "600",
                                  namespace=self.ns)  # fmt: skip
        return cid

    def exec(self, cid: str, *cmd: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        eid = f"e{time.monotonic_ns()}"
        return self.stack.containerd.ctr("task", "exec", "--exec-id", eid, cid, *cmd, check=False,
                                         timeout=timeout, namespace=self.ns)  # fmt: skip

    def logs(self) -> str:
        """The snapshotter's log and every daemon log under its root, concatenated."""
        parts = [self.snapshotter.log_path.read_text(errors="replace")]
        # Daemon logs live under <root>/logs (with --log-to-stdout they are in the snapshotter's);
        # never walk the whole root: it holds mounts being torn down and the FUSE mounts themselves.
        for top, _dirs, files in os.walk(self.root / "logs"):
            for name in sorted(files):
                with contextlib.suppress(OSError):
                    parts.append(f"\n=== {name}\n" + (Path(top) / name).read_text(errors="replace"))
        return "".join(parts)

    def close(self) -> None:
        ctrd = self.stack.containerd
        for cid in self.containers:
            ctrd.ctr("task", "rm", "-f", cid, check=False, namespace=self.ns, timeout=20)
            ctrd.ctr("container", "rm", cid, check=False, namespace=self.ns, timeout=20)
        for ref in dict.fromkeys(self.refs):
            ctrd.ctr("image", "rm", "--sync", ref, check=False, namespace=self.ns, timeout=60)
        ctrd.cleanup_namespace(self.ns)
        self.snapshotter.stop()
        for pid in _pids_using(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_below(self.root)


class Stack:
    """containerd with a ``nydus`` proxy snapshotter socket; scenarios take turns on that socket."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "s" / "nydus.sock"
        self.containerd = Containerd(workdir / "c", {"nydus": self.socket})
        self._count = 0
        # runc keeps state per namespace and container id machine-wide: unique per run.
        self.tag = secrets.token_hex(3)

    def start(self) -> None:
        self.containerd.start()

    def stop(self) -> None:
        self.containerd.stop()

    @contextlib.contextmanager
    def scenario(self, name: str, tmpl: Mapping[str, Any], toml: str = "",
                 env: Mapping[str, str] | None = None) -> Iterator[Scenario]:  # fmt: skip
        """A fresh snapshotter (root, cache, daemon template, config.toml, environment) for one test."""
        self._count += 1
        d = self.workdir / f"{self._count}"
        d.mkdir()
        (d / "nydusd.json").write_text(json.dumps(tmpl, indent=1))
        # [system] off: its socket path is fixed, and other snapshotters on this machine use it.
        (d / "config.toml").write_text("version = 1\n" + toml + "\n[system]\nenable = false\n")
        snap = NydusSnapshotter(d, self.socket, root=d / "r", env=env,
                                extra_args=["--config", str(d / "config.toml"), "--nydusd-path", NYDUSD,
                                            "--nydusd-config", str(d / "nydusd.json")])  # fmt: skip
        self.socket.unlink(missing_ok=True)
        snap.start()
        sc = Scenario(self, f"{name}{self._count}-{self.tag}", snap, f"e2er-{self.tag}-{name}-{self._count}")
        # containerd dials the proxy socket lazily and backs off after a failed dial: wait until
        # it reaches this snapshotter, so the first real call does not meet the backoff.
        # (`snapshots ls` is answered from containerd's own metadata; `prepare` reaches the proxy.)
        def reached() -> bool:
            return self.containerd.ctr("snapshots", "--snapshotter", "nydus", "prepare", "probe", check=False,
                                       namespace=sc.ns, timeout=10).returncode == 0  # fmt: skip

        wait_until(reached, 30, "containerd to reach the nydus snapshotter", interval=0.3)
        self.containerd.ctr("snapshots", "--snapshotter", "nydus", "rm", "probe", check=False,
                            namespace=sc.ns)  # fmt: skip
        try:
            yield sc
        finally:
            sc.close()
