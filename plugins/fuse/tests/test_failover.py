"""FUSE failover: `nydusd-py` killed with -9 under read load, a new daemon takes the session over.

Real kernel mount, real processes (root). The session holder (the process the snapshotter runs,
started here by the test) keeps the `/dev/fuse` fd and the state the daemon pushed on ``sendfd``. After every
``kill -9`` a new daemon is spawned on the live mountpoint, waits in INIT, is told ``takeover``
and ``start``, and must serve the same files with the same inode numbers. Readers run all along
and must see no error and only correct bytes; the longest single operation they saw is the
pause, printed (run with ``-s``; no bound is asserted: timings belong to ``bench/failover.py``,
which measures them against a same-run baseline).

``standby``: the next daemon is started ahead of the kill (imports done, blocked in INIT), as
upstream's upgrade path does on ``api<N+1>.sock``; ``cold``: it is spawned after the death.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import nydusd_py
from nydus_fuse.backend.client import FuseSessionClient
from nydus_fuse.backend.holder_client import HeldSession, SessionHolder

from nydus_core.control.daemons.client import NydusdApiError
from nydus_core.control.daemons.mounts import is_mounted, umount_tree
from nydus_core.testing.images import Image, build_image, localfs_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")

KILLS = int(os.environ.get("FAILOVER_KILLS", "20"))  # fewer for a quick local run
BIG = os.urandom((3 << 20) + 54321)  # four 1 MiB chunks
FILES = {
    "data/big.bin": BIG,
    "data/small.txt": b"small\n" * 100,
    **{f"dir/a/file-{i:03d}": str(i).encode() for i in range(60)},
    **{f"dir/b/entry-{i:03d}": b"x" * i for i in range(30)},
}
LISTINGS = {
    "dir/a": sorted(f"file-{i:03d}" for i in range(60)),
    "dir/b": sorted(f"entry-{i:03d}" for i in range(30)),
    "data": ["big.bin", "small.txt"],
    "": ["data", "dir"],
}


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nydfo-", dir="/tmp"))  # short: unix socket path limit
    yield path
    umount_tree(path)
    shutil.rmtree(path, ignore_errors=True)


class Daemons:
    """Spawns generations of one daemon (same id, mountpoint, supervisor; own api socket each)."""

    def __init__(self, root: Path, image: Image, supervisor: HeldSession) -> None:
        self.root = root
        self.mnt = root / "mnt"
        self.supervisor = supervisor
        self.config = root / "config.json"
        self.config.write_text(json.dumps(localfs_config(image.blob_dir, root / "cache")))
        self.image = image
        self.gen = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        self.gen += 1
        sock = self.root / f"api{self.gen}.sock"
        argv = [str(nydusd_py()), "fuse", "--mountpoint", str(self.mnt), "--apisock", str(sock),
                "--config", str(self.config), "--bootstrap", str(self.image.bootstrap),
                "--supervisor", str(self.supervisor.path), "--id", "fo1", "--failover-policy", "resend",
                "--log-level", "info", "--log-file", str(self.root / "nydusd.log"), *extra]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc, sock

    def wait_state(
        self, proc: subprocess.Popen[bytes], sock: Path, state: str, timeout: float = 20.0
    ) -> None:
        with FuseSessionClient(sock, timeout=5) as c:
            deadline = time.monotonic() + timeout
            while not c.wait_state(state, timeout=0.01, interval=0.005):
                assert proc.poll() is None, f"daemon exited: {(self.root / 'nydusd.log').read_text()}"
                assert time.monotonic() < deadline, f"no {state}: {(self.root / 'nydusd.log').read_text()}"

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


class Readers:
    """Two threads: one reads big.bin whole (page cache dropped each pass), one lists and opens."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.max_pause = 0.0
        self.ops = 0
        self.passes = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._read_big, self._list_dirs)]  # fmt: skip

    def _op(self, started: float) -> None:
        took = time.monotonic() - started
        with self._lock:
            self.ops += 1
            self.max_pause = max(self.max_pause, took)

    def _guard(self, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Exception as e:  # every error is a test failure
            self.errors.append(f"{type(e).__name__}: {e}")

    def _read_big(self) -> None:
        want = hashlib.sha256(BIG).hexdigest()
        path = self.mnt / "data" / "big.bin"
        while not self.stop.is_set():
            t = time.monotonic()
            fd = os.open(path, os.O_RDONLY)
            self._op(t)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the daemon serve every pass
                h = hashlib.sha256()
                while True:
                    t = time.monotonic()
                    chunk = os.read(fd, 256 << 10)
                    self._op(t)
                    if not chunk:
                        break
                    h.update(chunk)
            finally:
                os.close(fd)
            if h.hexdigest() != want:
                self.errors.append("big.bin read back wrong bytes")
            self.passes += 1

    def _list_dirs(self) -> None:
        while not self.stop.is_set():
            for rel, names in LISTINGS.items():
                t = time.monotonic()
                got = sorted(os.listdir(self.mnt / rel))
                self._op(t)
                if got != names:
                    self.errors.append(f"listing of /{rel} is {got[:5]}...")
            t = time.monotonic()
            data = (self.mnt / "dir" / "b" / "entry-029").read_bytes()
            self._op(t)
            if data != b"x" * 29:
                self.errors.append("entry-029 read back wrong bytes")

    def __enter__(self) -> Readers:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=30)
            assert not th.is_alive(), "a reader is stuck"


@pytest.mark.parametrize("mode", ["standby", "cold"])
def test_kill9_failover_no_reader_error(root: Path, mode: str) -> None:
    image = build_image(root / "img", FILES)
    holder = SessionHolder(root)
    sup = holder.ensure("fo1")
    ds = Daemons(root, image, sup)
    try:
        proc, sock = ds.spawn()
        ds.wait_state(proc, sock, "RUNNING")
        with FuseSessionClient(sock) as c:
            c.send_fd()
        assert sup.has_state
        ino_before = os.stat(ds.mnt / "data" / "big.bin").st_ino
        pauses: list[float] = []
        t0 = time.monotonic()
        with Readers(ds.mnt) as readers:
            time.sleep(0.3)
            for _ in range(KILLS):
                nxt = ds.spawn() if mode == "standby" else None
                if nxt is not None:
                    ds.wait_state(*nxt, "INIT")
                time.sleep(0.2)  # readers are busy
                ops_before = readers.ops
                t_kill = time.monotonic()
                proc.kill()
                proc.wait(timeout=10)
                proc, sock = nxt if nxt is not None else ds.spawn()
                ds.wait_state(proc, sock, "INIT")
                with FuseSessionClient(sock) as c:
                    c.takeover()
                    c.start()
                ds.wait_state(proc, sock, "RUNNING")
                # the first reader op completed after the kill measures the pause as readers see it
                while readers.ops <= ops_before + 2 and not readers.errors:
                    time.sleep(0.001)
                pauses.append(time.monotonic() - t_kill)
                assert not readers.errors, readers.errors
            time.sleep(0.3)
        elapsed = time.monotonic() - t0
        assert not readers.errors, readers.errors
        assert readers.passes >= KILLS // 2, f"only {readers.passes} full reads of big.bin"
        assert os.stat(ds.mnt / "data" / "big.bin").st_ino == ino_before
        print(f"\n[failover {mode}] {KILLS} kill -9 in {elapsed:.1f}s: {readers.ops} reader ops, "
              f"{readers.passes} full passes of big.bin, no error; longest reader op "
              f"{readers.max_pause * 1000:.0f} ms; kill->served max {max(pauses) * 1000:.0f} ms")  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not is_mounted(ds.mnt)
    finally:
        ds.kill_all()
        umount_tree(ds.mnt)
        holder.shutdown(force=True)


def test_takeover_without_supervisor_state_is_refused(root: Path) -> None:
    """A daemon told to take over when the supervisor holds nothing answers an error, stays INIT."""
    image = build_image(root / "img", {"f": b"1"})
    holder = SessionHolder(root)
    sup = holder.ensure("fo1")
    ds = Daemons(root, image, sup)
    try:
        proc, sock = ds.spawn("--upgrade")
        ds.wait_state(proc, sock, "INIT")
        with FuseSessionClient(sock) as c:
            with pytest.raises(NydusdApiError) as err:
                c.takeover()
            assert err.value.status == 503
            with pytest.raises(NydusdApiError):
                c.start()
            assert c.state() == "INIT"
        assert not is_mounted(ds.mnt)
    finally:
        ds.kill_all()
        umount_tree(ds.mnt)
        holder.shutdown(force=True)


def test_hot_upgrade_protocol_under_load(root: Path) -> None:
    """Upstream's upgrade order on nydusd-py: sendfd (old) -> spawn --upgrade on a new socket ->
    INIT -> takeover -> exit (old, leaves the mount) -> start (new) -> RUNNING. Readers see no
    error; the old daemon exits 0 with the mount still there. (Same program on both sides: the
    snapshotter's ``PUT /api/v1/daemons/upgrade`` is not wired yet.)"""
    image = build_image(root / "img", FILES)
    holder = SessionHolder(root)
    sup = holder.ensure("fo1")
    ds = Daemons(root, image, sup)
    try:
        old, old_sock = ds.spawn()
        ds.wait_state(old, old_sock, "RUNNING")
        with FuseSessionClient(old_sock) as c:
            c.send_fd()
            before = c.daemon_info().version
        with Readers(ds.mnt) as readers:
            time.sleep(0.3)
            new, new_sock = ds.spawn("--upgrade")
            ds.wait_state(new, new_sock, "INIT")
            with FuseSessionClient(new_sock) as c:
                c.takeover()
                assert c.state() == "READY"
            with FuseSessionClient(old_sock) as c:
                c.exit()
            assert old.wait(timeout=15) == 0
            assert is_mounted(ds.mnt)
            with FuseSessionClient(new_sock) as c:
                c.start()
            ds.wait_state(new, new_sock, "RUNNING")
            with FuseSessionClient(new_sock) as c:
                after = c.daemon_info().version
            time.sleep(0.5)
        assert not readers.errors, readers.errors
        print(f"\n[upgrade] version {before.get('package_ver')} -> {after.get('package_ver')}; "
              f"longest reader op {readers.max_pause * 1000:.0f} ms, no error")  # fmt: skip
        new.send_signal(signal.SIGTERM)
        assert new.wait(timeout=15) == 0
        assert not is_mounted(ds.mnt)
    finally:
        ds.kill_all()
        umount_tree(ds.mnt)
        holder.shutdown(force=True)
