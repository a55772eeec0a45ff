"""The backend conformance suite: what every backend distribution runs against its own backend.

containerd's ``snapshots/testsuite`` is the model: one suite, every implementation. A backend
author subclasses `BackendConformance` in a test module and names the backend::

    from nydus_core.testing.conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        fs_driver = "my-backend"          # the BackendRecord's name
        daemon_mode = "dedicated"         # optional, as in config.toml
        recover_policy = "restart"

The suite then, with real services (docker-registry, containerd 1.6, runc, the kernel):

1. builds an OCI image with a tree that exercises a filesystem (hard links, symlinks, xattrs, a
   setuid file, a fifo, a 3 MiB file across chunk boundaries, 200 entries in one directory, a
   whiteout and an opaque directory in the second layer), converts it with our ``nydusify`` and
   pushes both to the registry;
2. starts this backend's snapshotter (in process, exactly as ``containerd-nydus-grpc`` starts it)
   and containerd with it as proxy plugin; ``ctr-remote image rpull`` pulls the nydus image;
3. `test_view_matches_the_source_image`: a View of the image, mounted as containerd would, is
   compared entry by entry (type, mode, owner, mtime, size, link target, xattrs, hard link count)
   and byte by byte with the source OCI image's layers merged;
4. `test_container_reads_the_image`: ``ctr run`` a container on it and read files inside;
5. `test_daemon_killed_and_recovered` (backends with daemons): kill -9 every daemon; per
   ``recover_policy`` the image is served again (``restart``), and with the backend's
   ``failover`` capability a container running across the kill keeps reading the right bytes;
6. `test_snapshotter_restart_keeps_serving`: the snapshotter stops and starts on the same root
   (its daemons and mounts outlive it); the running container and a new one read the image;
7. `test_removal_leaves_nothing`: containers, image and snapshots go, containerd garbage-collects,
   and nothing is left mounted under the root nor running for it.

The backend comes from the installed entry points unless `BackendConformance.plugins` names
plugin objects. Tests run in the order above and share one stack per class. Root, containerd,
runc, docker-registry, skopeo and ctr-remote are needed (``scripts/setup-system.sh``).
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
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest

from nydus_core.cli.lifecycle import RunningSnapshotter
from nydus_core.config import DaemonConfig, LogConfig, SnapshotterConfig, SystemConfig
from nydus_core.control.daemons.mounts import mounts_under, umount_tree
from nydus_core.control.snapshot.model import Kind
from nydus_core.plugins import NydusPluginManager, build_plugin_manager
from nydus_core.records import BackendRecord
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.services import (
    PLAIN_HTTP_NYDUSD_TEMPLATE,
    Containerd,
    Registry,
    ServiceError,
    live_pids_mentioning,
    process_alive,
    wait_until,
)

SNAPSHOTTER = "nydus"  # the proxy plugin's name: containerd and ctr-remote call it so
BIG_FILE = "data/big.bin"
BIG_SIZE = 3 * (1 << 20) + 123  # across chunk boundaries, not a multiple of a block
MTIME = 1_700_000_000

# --------------------------------------------------------------------------------------------
# The test image
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ConformanceImage:
    """The OCI image, its nydus conversion, and what a reader must find in it."""

    oci_ref: str
    nydus_ref: str
    big_sha256: str


def _member(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
            link: str = "", size: int = 0,
            xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size = kind, mode, uid, gid, size
    info.mtime, info.linkname = MTIME, link
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info


def _tar(entries: Sequence[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def image_layers(big: bytes) -> list[bytes]:
    """The two layer tars (uncompressed) of the conformance image."""
    busybox = Path("/bin/busybox").read_bytes()
    d = tarfile.DIRTYPE
    first: list[tuple[tarfile.TarInfo, bytes]] = [
        (_member("bin", d, mode=0o755), b""),
        (_member("bin/busybox", mode=0o755, size=len(busybox)), busybox),
        *((_member(f"bin/{a}", tarfile.SYMTYPE, mode=0o777, link="busybox"), b"")
          for a in ("sh", "cat", "ls", "sha256sum", "stat", "readlink", "sleep", "true", "test")),
        (_member("etc", d, mode=0o755), b""),
        (_member("etc/hello.txt", size=19), b"hello from layer 1\n"),
        (_member("data", d, mode=0o755), b""),
        (_member(BIG_FILE, size=len(big)), big),
        (_member("data/empty"), b""),
        (_member("data/small.txt", size=6), b"small\n"),
        (_member("data/hard", tarfile.LNKTYPE, link="data/small.txt"), b""),
        (_member("data/link", tarfile.SYMTYPE, mode=0o777, link="small.txt"), b""),
        (_member("data/dangling", tarfile.SYMTYPE, mode=0o777, link="/nowhere/at/all"), b""),
        (_member("data/xattr.txt", size=7, xattrs={"user.nydus": "conformance"}), b"xattrs\n"),
        (_member("data/secret", mode=0o600, uid=1000, gid=1000, size=7), b"secret\n"),
        (_member("data/setuid", mode=0o4755, size=4), b"#!x\n"),
        (_member("data/fifo", tarfile.FIFOTYPE, mode=0o644), b""),
        (_member("data/gone.txt", size=5), b"gone\n"),
        (_member("data/opaque", d, mode=0o755), b""),
        (_member("data/opaque/a.txt", size=2), b"a\n"),
        (_member("data/many", d, mode=0o750), b""),
        *((_member(f"data/many/f{i:03d}", size=4), f"{i:03d}\n".encode()) for i in range(200)),
    ]
    second: list[tuple[tarfile.TarInfo, bytes]] = [
        (_member("etc", d, mode=0o755), b""),
        (_member("etc/hello.txt", size=19), b"hello from layer 2\n"),
        (_member("data", d, mode=0o755), b""),
        (_member("data/.wh.gone.txt"), b""),
        (_member("data/opaque", d, mode=0o755), b""),
        (_member("data/opaque/.wh..wh..opq"), b""),
        (_member("data/opaque/b.txt", size=2), b"b\n"),
        (_member("data/new.txt", size=4), b"new\n"),
    ]
    return [_tar(first), _tar(second)]


def _put(blobs: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_conformance_image(registry: Registry, workdir: Path, repo: str = "conformance") -> ConformanceImage:
    """Write the OCI image as an OCI layout, push it with skopeo, convert it with our nydusify."""
    skopeo = shutil.which("skopeo")
    if skopeo is None or not Path("/bin/busybox").exists():
        raise ServiceError("skopeo and /bin/busybox are needed (apt-get install skopeo busybox-static)")
    big = os.urandom(BIG_SIZE)
    layout = workdir / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers, diff_ids = [], []
    for tar in image_layers(big):
        diff_ids.append(f"sha256:{hashlib.sha256(tar).hexdigest()}")
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       **_put(blobs, gzip.compress(tar, mtime=0))})  # fmt: skip
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "conformance layer 1"}, {"created_by": "conformance layer 2"}],
    }  # fmt: skip
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_put(blobs, json.dumps(config).encode())},
        "layers": layers,
    }  # fmt: skip
    top = _put(blobs, json.dumps(manifest).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **top,
         "annotations": {"org.opencontainers.image.ref.name": repo}}]}))  # fmt: skip
    oci_ref = f"{registry.host}/{repo}:oci"
    nydus_ref = f"{registry.host}/{repo}:nydus"
    _run([skopeo, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{repo}", f"docker://{oci_ref}"])
    nydusify = Path(sys.executable).with_name("nydusify")
    argv = [str(nydusify)] if nydusify.exists() else [sys.executable, "-m", "nydus_core.cli.nydusify"]
    _run([*argv, "convert", "--source", oci_ref, "--target", nydus_ref, "--plain-http"])
    return ConformanceImage(oci_ref=oci_ref, nydus_ref=nydus_ref, big_sha256=hashlib.sha256(big).hexdigest())


def _run(argv: Sequence[str], timeout: float = 300) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# The stack: registry, containerd, this backend's snapshotter
# --------------------------------------------------------------------------------------------


class ConformanceStack:
    """One class's services: containerd with the snapshotter under test as proxy plugin."""

    def __init__(self, suite: BackendConformance, registry: Registry, workdir: Path) -> None:
        self.suite = suite
        self.registry = registry
        self.workdir = workdir
        self.root = Path(tempfile.mkdtemp(prefix="nyc-", dir="/tmp"))  # short: socket paths below it
        self.address = self.root / "snapshotter.sock"
        self.config = suite.make_config(self.root, self.address)
        self.containerd = Containerd(workdir / "containerd", {SNAPSHOTTER: self.address})
        self.namespace = self.containerd.namespace
        self.running: RunningSnapshotter | None = None
        self.pm: NydusPluginManager | None = None
        self.image = build_conformance_image(registry, workdir / "image")
        self.containers: list[str] = []

    # -- the snapshotter ----------------------------------------------------------------------
    def start_snapshotter(self) -> None:
        """Start (or start again) the snapshotter exactly as ``containerd-nydus-grpc`` does; a new
        plugin manager each time, as a new process would have."""
        self.pm = self.suite.plugin_manager()
        self.running = RunningSnapshotter.start(self.config, self.pm, liveness_interval=0.5)

    def stop_snapshotter(self) -> None:
        if self.running is not None:
            self.running.stop()
            self.running = None

    @property
    def record(self) -> BackendRecord:
        assert self.pm is not None
        return self.pm.registry.require_backend(self.config.daemon.fs_driver)

    def daemons(self) -> list[Any]:
        assert self.running is not None and self.running.images is not None
        daemons: list[Any] = self.running.images.daemons()
        return daemons

    def start(self) -> None:
        self.start_snapshotter()
        self.containerd.start()
        ctr_remote = shutil.which("ctr-remote")
        if ctr_remote is None:
            raise ServiceError("ctr-remote is needed (apt-get install stargz-snapshotter)")
        _run([ctr_remote, "--address", self.containerd.address, "-n", self.namespace, "image", "rpull",
              "--plain-http", "--snapshotter", SNAPSHOTTER, self.image.nydus_ref])  # fmt: skip

    # -- containers ---------------------------------------------------------------------------
    def run(self, *cmd: str, timeout: float = 120) -> str:
        """Run `cmd` in a new container on the image; its stdout."""
        cid = f"conf-{secrets.token_hex(4)}"
        out = self.containerd.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, self.image.nydus_ref, cid,
                                  *cmd, timeout=timeout)  # fmt: skip
        return out.stdout

    def start_container(self) -> str:
        """A container that stays up (``sleep``); its id."""
        cid = f"conf-{secrets.token_hex(4)}"
        self.containerd.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, self.image.nydus_ref, cid,
                            "sleep", "3600")  # fmt: skip
        self.containers.append(cid)
        return cid

    def exec(self, cid: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr("tasks", "exec", "--exec-id", f"x{secrets.token_hex(3)}", cid, *cmd,
                                   check=False, timeout=timeout)  # fmt: skip

    def stop_containers(self) -> None:
        for cid in self.containers:
            with contextlib.suppress(ServiceError):
                self.containerd.kill_task(cid)
            self.containerd.ctr("containers", "delete", cid, check=False, timeout=30)
        self.containers.clear()

    # -- the image as a View ------------------------------------------------------------------
    @contextlib.contextmanager
    def view(self) -> Iterator[Path]:
        """The image's top snapshot as a View, mounted as containerd would mount it."""
        with SnapshotterClient(self.address) as client:
            committed = [i for i in client.list() if i.kind is Kind.COMMITTED]
            parents = {i.parent for i in committed}
            (top,) = [i.name for i in committed if i.name not in parents]
            key = f"conformance-view-{secrets.token_hex(3)}"
            mounts = client.view(key, parent=top)
            target = self.workdir / key
            target.mkdir()
            try:
                self.suite.mount(mounts, target)
                try:
                    yield target
                finally:
                    umount_tree(target)
            finally:
                client.remove(key)

    def drop_caches(self) -> None:
        """Page cache out, so reads reach the backend again."""
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def stop(self) -> None:
        try:
            self.stop_containers()
            self.containerd.stop()
        finally:
            self.stop_snapshotter()
            self.suite.stop_leftovers(self)
            umount_tree(self.root)
            shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


class BackendConformance:
    """Subclass with ``fs_driver = "<name>"`` (and, if need be, the other class attributes)."""

    #: the backend record under test (``[daemon] fs_driver``)
    fs_driver: ClassVar[str] = ""
    #: ``daemon_mode`` and ``[daemon] recover_policy`` as in ``config.toml``
    daemon_mode: ClassVar[str] = "dedicated"
    recover_policy: ClassVar[str] = "restart"
    #: plugin objects to register; empty: the installed entry points (what users get)
    plugins: ClassVar[Sequence[object]] = ()
    #: values of plugin-registered config keys (``{"daemon.failover_standby": True}``)
    plugin_options: ClassVar[dict[str, Any]] = {}

    # -- what a backend author may override ------------------------------------------------
    def plugin_manager(self) -> NydusPluginManager:
        return build_plugin_manager(self.plugins, entry_points=not self.plugins)

    def make_config(self, root: Path, address: Path) -> SnapshotterConfig:
        """The snapshotter configuration: this backend, a nydusd template for the local plain-http
        registry (daemon backends read it), logs to stdout, no system socket."""
        template = root / "nydusd-config.json"
        template.write_text(json.dumps(PLAIN_HTTP_NYDUSD_TEMPLATE))
        beside = Path(sys.executable).with_name("nydusd-py")
        program = str(beside) if beside.exists() else "nydusd-py"
        return SnapshotterConfig(
            root=root, address=address, daemon_mode=self.daemon_mode,
            daemon=DaemonConfig(fs_driver=self.fs_driver, recover_policy=self.recover_policy,
                                nydusd_config=template, nydusd_path=program),
            log=LogConfig(log_to_stdout=True, level="info"),
            system=SystemConfig(enable=False, address=root / "system.sock"),
            plugin_options=dict(self.plugin_options),
        )  # fmt: skip

    def mount(self, mounts: Sequence[Any], target: Path) -> None:
        """Mount what the snapshotter returned for a View at `target` (the shapes containerd
        mounts: bind and overlay). A backend whose mounts the host cannot mount overrides it."""
        for m in mounts:
            if m.type == "bind":
                _run(["mount", "--rbind", m.source, str(target)], timeout=30)
                if "ro" in m.options:
                    _run(["mount", "-o", "remount,bind,ro", str(target)], timeout=30)
            else:
                _run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], timeout=30)

    def stop_leftovers(self, stack: ConformanceStack) -> None:
        """Teardown: stop the daemons a test left (a real stop keeps them on purpose), then what
        the backend keeps beside them, then anything still naming the root."""
        pm = stack.suite.plugin_manager()
        record = pm.registry.backend(stack.config.daemon.fs_driver)
        if record is not None:
            from nydus_core.control.daemons.store import DaemonStore

            db = stack.root / "nydus.db"
            if db.exists():
                store = DaemonStore(db)
                try:
                    for daemon in store.list_daemons():
                        with contextlib.suppress(Exception):
                            record.backend.stop(daemon)
                finally:
                    store.close()
            with contextlib.suppress(Exception):
                record.backend.purge(stack.root)
        for pid in live_pids_mentioning(str(stack.root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    # -- the stack -----------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def conformance(
        cls, registry: Registry, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[ConformanceStack]:
        if os.geteuid() != 0:
            pytest.skip("the conformance suite mounts images and runs containers: it needs root")
        if not cls.fs_driver:
            pytest.fail(f"{cls.__name__} must set fs_driver to the backend under test")
        stack = ConformanceStack(cls(), registry, tmp_path_factory.mktemp(f"conformance-{cls.fs_driver}"))
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()

    # -- the tests, in order -------------------------------------------------------------------
    def test_view_matches_the_source_image(self, conformance: ConformanceStack) -> None:
        from nydus_core.data.rafs.tree import tree_from_dir
        from nydus_core.tools.convert.check import compare_trees, image_tree
        from nydus_core.tools.convert.image import Transport

        work = conformance.workdir / "source"
        work.mkdir(exist_ok=True)
        source = image_tree(conformance.image.oci_ref, str(work), Transport(plain_http=True))
        with conformance.view() as mounted:
            served = tree_from_dir(mounted)
            # The root's own attributes are the snapshot directory's, not the image's.
            for attr in ("mode", "uid", "gid", "mtime", "mtime_nsec", "xattrs"):
                setattr(served, attr, getattr(source, attr))
            problems = list(compare_trees(source, served))
        assert problems == [], "\n".join(problems[:40])
        assert len(source.entries[b"data"].entries[b"many"].entries) == 200  # the test tree is real

    def test_container_reads_the_image(self, conformance: ConformanceStack) -> None:
        conformance.drop_caches()
        out = conformance.run("sha256sum", f"/{BIG_FILE}")
        assert out.split()[0] == conformance.image.big_sha256
        assert conformance.run("cat", "/etc/hello.txt", "/data/opaque/b.txt") == "hello from layer 2\nb\n"
        data = conformance.run("ls", "-a", "/data").split()
        assert "gone.txt" not in data and "new.txt" in data and "hard" in data  # the whiteout holds
        listing = conformance.run("ls", "/data/opaque", "/data/many").split()
        assert "a.txt" not in listing and "b.txt" in listing and "f199" in listing  # and the opaque dir

    def test_daemon_killed_and_recovered(self, conformance: ConformanceStack) -> None:
        record = conformance.record
        if not record.capabilities.daemon:
            pytest.skip(f"backend {record.name} runs no daemons: nothing to kill")
        if conformance.config.daemon.recover_policy == "none":
            pytest.skip("recover_policy none: a dead daemon is forgotten, by design")
        failover = record.capabilities.failover and conformance.config.daemon.recover_policy == "failover"
        running = conformance.start_container() if failover else None
        before = {d.id: d.pid for d in conformance.daemons()}
        assert before, "the image is served, yet no daemon is recorded"
        for pid in before.values():
            os.kill(pid, 9)

        def recovered() -> bool:
            now = {d.id: d.pid for d in conformance.daemons()}
            return set(now) == set(before) and all(now[i] != before[i] and process_alive(now[i]) for i in now)

        wait_until(recovered, 60, "the killed daemons to be replaced")
        conformance.drop_caches()
        if running is not None:  # failover: the running container never noticed
            done = conformance.exec(running, "sha256sum", f"/{BIG_FILE}")
            assert done.returncode == 0 and done.stdout.split()[0] == conformance.image.big_sha256, done
        out = conformance.run("sha256sum", f"/{BIG_FILE}")
        assert out.split()[0] == conformance.image.big_sha256

    def test_snapshotter_restart_keeps_serving(self, conformance: ConformanceStack) -> None:
        cid = conformance.start_container()
        conformance.stop_snapshotter()
        conformance.drop_caches()
        done = conformance.exec(cid, "sha256sum", f"/{BIG_FILE}")  # no snapshotter at all right now
        assert done.returncode == 0 and done.stdout.split()[0] == conformance.image.big_sha256, done
        conformance.start_snapshotter()
        conformance.containerd.wait_until_reachable(SNAPSHOTTER, cid)  # its active snapshot's key
        done = conformance.exec(cid, "cat", "/data/small.txt")
        assert done.returncode == 0 and done.stdout == "small\n", done
        assert conformance.run("cat", "/data/new.txt") == "new\n"

    def test_removal_leaves_nothing(self, conformance: ConformanceStack) -> None:
        conformance.stop_containers()
        ctr = conformance.containerd
        ctr.ctr("images", "rm", "--sync", conformance.image.nydus_ref, check=False)
        ctr.gc()

        def released() -> bool:
            assert conformance.running is not None and conformance.running.images is not None
            return not conformance.running.images.instances()

        wait_until(released, 30, "the image instance to be released after garbage collection")
        with SnapshotterClient(conformance.address) as client:
            assert client.list() == [], "containerd's GC left snapshots"
        # a shared daemon outlives its last image (upstream's behaviour): only its own mount may stay
        shared: set[Path] = set()
        if conformance.config.daemon_mode == "shared":
            shared = {d.mountpoint for d in conformance.daemons()}
        left_mounted = [m for m in mounts_under(conformance.root) if m not in shared]
        assert left_mounted == [], f"still mounted under the root: {left_mounted}"
        if not shared:
            wait_until(lambda: not conformance.daemons(), 10, "the daemons to stop")
            left = [p for p in live_pids_mentioning(str(conformance.root / "socket")) if process_alive(p)]
            assert left == [], f"daemon processes left running: {left}"
