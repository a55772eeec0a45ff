"""The snapshotter itself is killed -9 in the middle of a failover; after its restart all is consistent.

Real processes throughout: ``containerd-nydus-grpc`` (driven over its gRPC socket the way
containerd would: claim the data blob, unpack and commit the bootstrap layer, prepare a
container), ``nydusd-py`` serving a real FUSE mount, the session holder, and a reader process
under load on the mount. With ``recover_policy = "failover"`` the daemon is killed -9; the
snapshotter notices and, through the test-only ``NYDUS_SNAPSHOTTER_CRASH_AT`` fault injection
(`nydus_core.faults`), kills itself at a named step of the failover. A second snapshotter is
started on the same root without the fault, and then:

* the reader never saw an error and read the right bytes (the session holder kept the FUSE
  session, so the kernel queued the requests until a daemon served them again);
* exactly one daemon process exists for the record, its pid is the recorded one, and no other
  process of the test root is left (no orphan replacement);
* one mount at the mountpoint; the system API (``/api/v1/daemons`` and ``/records``) names
  that pid;
* the session holder is the same process as before the crash, its sockets are 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuse_helpers import nydusd_py
from nydus_fuse.backend.crash_points import STANDBY_SPAWNED, STEPS
from nydus_fuse.backend.holder_client import SessionHolder
from nydus_fuse.backend.standby import Standby, is_warm

from nydus_core import labels as L
from nydus_core.control.daemons.client import NydusdClient
from nydus_core.faults import CRASH_ENV
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.images import Image, build_image
from nydus_core.testing.services import (
    NydusSnapshotter,
    ServiceError,
    live_pids_mentioning,
    unmount_below,
    wait_until,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")

READER = Path(__file__).with_name("failover_reader.py")
REF = "localhost/test/crash:latest"
BIG = os.urandom((2 << 20) + 4321)
FILES = {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}}


def spare_pids(root: Path) -> list[int]:
    """The snapshotter's spare daemon (``[daemon] spare_daemon``, on by default): not a daemon yet."""
    return live_pids_mentioning(str(root / "spare") + "/")


def mount_count(path: Path) -> int:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f].count(str(path))


class Stack:
    """A snapshotter root with a nydus image committed, and the snapshotter process serving it."""

    def __init__(self, workdir: Path, image: Image, mode: str = "dedicated") -> None:
        self.mode = mode
        self.workdir = workdir
        self.image = image
        self.root = workdir / "root"
        self.address = workdir / "nydus.sock"
        template = workdir / "nydusd.json"
        template.write_text(json.dumps({
            "device": {"backend": {"type": "localfs", "config": {"dir": str(image.blob_dir)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": ""}}},
            "mode": "direct", "digest_validate": False, "fs_prefetch": {"enable": False},
        }))  # fmt: skip
        self.system = workdir / "system.sock"
        self.config = workdir / "config.toml"
        self.config.write_text(
            "version = 1\n"
            f'daemon_mode = "{"shared" if mode == "shared" else "dedicated"}"\n'
            "[system]\nenable = true\n"
            f'address = "{self.system}"\n'
            "[daemon]\n"
            f'nydusd_path = "{nydusd_py()}"\n'
            f'nydusd_config = "{template}"\n'
            'recover_policy = "failover"\n'
            f"failover_standby = {'true' if mode == 'standby' else 'false'}\n"
        )

    def snapshotter(self, env: dict[str, str] | None = None) -> NydusSnapshotter:
        return NydusSnapshotter(self.workdir, self.address, root=self.root,
                                extra_args=["--config", str(self.config)], env=env,
                                system_address=self.system, log_level="info")  # fmt: skip

    def pull_and_prepare(self) -> Path:
        """What containerd does for a nydus image and one container; the daemon's mountpoint."""
        with SnapshotterClient(self.address) as c:
            cri = {L.CRI_IMAGE_REF: REF}
            with pytest.raises(grpc.RpcError) as err:
                c.prepare("extract-1 sha256:blob", "",
                          {L.TARGET_SNAPSHOT_REF: "sha256:blob", L.NYDUS_BLOB: "true", **cri})  # fmt: skip
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
            meta_labels = {L.TARGET_SNAPSHOT_REF: "sha256:meta", L.NYDUS_BOOTSTRAP: "true", **cri}
            mounts = c.prepare("extract-2 sha256:meta", "sha256:blob", meta_labels)
            upper = next(Path(o.split("=", 1)[1]) for m in mounts for o in m.options
                         if o.startswith("upperdir="))  # fmt: skip
            boot = upper / "image" / "image.boot"
            boot.parent.mkdir(parents=True)
            shutil.copyfile(self.image.bootstrap, boot)
            c.commit("sha256:meta", "extract-2 sha256:meta", meta_labels)
        self.meta_dir = upper.parent
        return self.prepare_container("container-1")

    def prepare_container(self, key: str) -> Path:
        """Prepare a container snapshot on the image; the daemon's mountpoint of the image."""
        with SnapshotterClient(self.address) as c:
            mounts = c.prepare(key, "sha256:meta")
        lower = next(o.split("=", 1)[1] for o in mounts[0].options if o.startswith("lowerdir="))
        mnt = Path(lower.split(":")[0])
        meta_id = self.meta_dir.name
        want = self.root / "mnt" / meta_id if self.mode == "shared" else self.meta_dir / "mnt"
        assert mnt == want, mounts
        return mnt

    def release(self) -> None:
        with SnapshotterClient(self.address) as c:
            for key in ("container-1", "container-2", "sha256:meta", "sha256:blob"):
                try:
                    c.remove(key)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            c.cleanup()


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nysc-", dir="/tmp"))  # short: unix socket paths
    yield d
    for pid in live_pids_mentioning(str(d)):  # snapshotter, daemons, holder of this test only
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    d = Path(tempfile.mkdtemp(prefix="nysc-img-", dir="/tmp"))
    yield build_image(d, FILES)
    shutil.rmtree(d, ignore_errors=True)


def _new_standby(sockets: Path, snap: NydusSnapshotter) -> list[int]:
    """The daemon's warm standby (started in the background): its pid once recorded and warm."""
    pid_file = sockets / "standby.pid"
    found: list[int] = []

    def recorded() -> bool:
        with contextlib.suppress(OSError, ValueError):
            pid_text, sock = pid_file.read_text().split()
            pid = int(pid_text)
            # warm: a death now is taken over by it (one still loading may not be, under load)
            if pid in live_pids_mentioning(str(sockets)) and is_warm(Standby(pid, Path(sock))):
                found[:] = [pid]
                return True
        return False

    try:
        wait_until(recorded, 30, f"a new standby recorded in {pid_file} and warm")
    except ServiceError as e:
        raise AssertionError(f"{e}\n{snap.log_tail()}") from e
    return found


def _daemon_state(api_socket: Path) -> str:
    try:
        with NydusdClient(api_socket, timeout=2) as c:
            return c.state()
    except Exception as e:  # reported in the assertion message
        return f"unreachable: {e}"


SHARED_STEPS = ("failover-spawned", "failover-taken-over")
STANDBY_STEPS = ("failover-taken-over", "failover-started")  # a promoted standby is not spawned
CASES = [("dedicated", step) for step in STEPS] + [("shared", step) for step in SHARED_STEPS] + \
    [("standby", step) for step in STANDBY_STEPS]


@pytest.mark.parametrize(("mode", "step"), CASES)
def test_snapshotter_killed_during_failover(mode: str, step: str, workdir: Path, image: Image) -> None:
    stack = Stack(workdir, image, mode)
    snap = stack.snapshotter(env={CRASH_ENV: step})
    snap.start()
    reader = None
    try:
        mnt = stack.pull_and_prepare()
        (daemon,) = snap.system_get("/api/v1/daemons")
        holder = SessionHolder(stack.root)
        holder_pid = holder.pid()
        assert holder_pid is not None and holder.holds(daemon["id"])
        for sock in (holder.control, Path(daemon["supervisor_path"])):
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600, sock
        api_socket = Path(daemon["api_socket"])
        sockets = api_socket.parent  # every process of the daemon (standby too) has its socket here
        fuse_mount = Path(daemon["mountpoint"])  # the image's directory in shared mode is inside it
        standby: list[int] = []
        if mode == "standby":  # wait for the warm standby (started in the background once ready)
            standby = _new_standby(sockets, snap)  # recorded: a failover now promotes it

        stop_file = workdir / "stop-reader"
        want = hashlib.sha256(BIG).hexdigest()
        reader = subprocess.Popen([sys.executable, str(READER), str(mnt), want, "120", str(stop_file)],
                                  stdout=subprocess.PIPE)  # fmt: skip
        time.sleep(0.5)
        t0 = time.monotonic()
        os.kill(daemon["pid"], signal.SIGKILL)
        assert snap._proc is not None and snap._proc._proc is not None
        snap._proc._proc.wait(timeout=30)  # the fault injection killed it at `step`
        crashed_at = time.monotonic() - t0
        assert f"killing the snapshotter at step {step}" in snap.log_tail()
        left = live_pids_mentioning(str(sockets))
        snap.kill9()  # reap and close its log

        again = stack.snapshotter()
        again.start()
        restarted = time.monotonic() - t0
        now_socket = Path(again.system_get("/api/v1/daemons")[0]["api_socket"])
        wait_until(lambda: _daemon_state(now_socket) == "RUNNING", 30, "the daemon to serve again")
        time.sleep(0.5)  # the reader goes on against the new daemon
        stop_file.touch()
        out, _ = reader.communicate(timeout=60)
        result: dict[str, Any] = json.loads(out)
        reader = None

        # the reader saw no error: the holder kept the session through both crashes
        assert not result["errors"], result
        # exactly one daemon process, and it is the one recorded and reported (plus, with a
        # standby, the new standby the promotion is followed by, recorded in standby.pid)
        new_standby = _new_standby(sockets, again) if standby else []
        procs = [p for p in live_pids_mentioning(str(sockets)) if p not in new_standby]
        (listed,) = again.system_get("/api/v1/daemons")
        (record,) = again.system_get("/api/v1/daemons/records")
        assert listed["id"] == record["id"] == daemon["id"]
        assert procs == [listed["pid"]] == [record["pid"]], (procs, listed, record, again.log_tail())
        assert listed["pid"] != daemon["pid"]
        assert live_pids_mentioning(listed["api_socket"] + "\0") == procs
        if step == "failover-noticed":
            assert left == []  # nothing was spawned yet: the new snapshotter spawned the replacement
        else:
            assert procs[0] in left, (left, procs)  # the replacement found at start-up was adopted
        if standby:
            assert procs == standby  # the promoted standby serves (and no new one after a restart)
        # no orphans: the test root's processes are the snapshotter, the holder and the daemon
        assert sorted(live_pids_mentioning(str(workdir))) == sorted(
            [again.pid or 0, holder_pid or 0, *procs, *new_standby, *spare_pids(stack.root)]
        ), again.log_tail()
        assert mount_count(fuse_mount) == 1
        assert (mnt / "d" / "f7").read_bytes() == b"7" * 7
        # the same holder serves the new snapshotter, and it holds the new daemon's session again
        assert holder.pid() == holder_pid and holder.holds(daemon["id"])
        print(f"\n[{mode}: snapshotter kill -9 at {step}] crashed {crashed_at:.2f}s after the daemon kill, "
              f"serving again {restarted:.2f}s after it; reader: {result['ops']} ops, longest "
              f"{result['max_pause'] * 1000:.0f} ms, no error; stale processes at the crash: {left}")

        stack.release()
        if mode != "shared":
            assert not live_pids_mentioning(str(sockets)) and mount_count(fuse_mount) == 0
            assert daemon["id"] not in holder.status()
        else:  # the shared daemon stays up, empty, as it does without failover
            assert not (fuse_mount / mnt.name).exists() and mount_count(fuse_mount) == 1
        again.stop()
        assert holder.pid() == holder_pid  # the holder outlives a graceful stop too
        assert holder.shutdown(force=mode == "shared")
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        snap.kill9()


def test_daemon_killed_while_no_snapshotter_runs(workdir: Path, image: Image) -> None:
    """The case the session holder exists for: the snapshotter is down (kill -9) when the daemon
    dies; nobody notices for a while, the mount stays (the holder keeps the session), readers wait,
    and the next snapshotter fails the daemon over at start-up."""
    stack = Stack(workdir, image)
    snap = stack.snapshotter()
    snap.start()
    reader = None
    try:
        mnt = stack.pull_and_prepare()
        (daemon,) = snap.system_get("/api/v1/daemons")
        holder = SessionHolder(stack.root)
        holder_pid = holder.pid()
        api_socket = Path(daemon["api_socket"])
        stop_file = workdir / "stop-reader"
        want = hashlib.sha256(BIG).hexdigest()
        reader = subprocess.Popen([sys.executable, str(READER), str(mnt), want, "120", str(stop_file)],
                                  stdout=subprocess.PIPE)  # fmt: skip
        time.sleep(0.5)
        snap.kill9()
        t0 = time.monotonic()
        os.kill(daemon["pid"], signal.SIGKILL)
        time.sleep(1.0)  # nobody serves the mount; it must still be there
        assert mount_count(Path(daemon["mountpoint"])) == 1 and holder.holds(daemon["id"])
        again = stack.snapshotter()
        again.start()
        wait_until(lambda: _daemon_state(api_socket) == "RUNNING", 30, "the daemon to serve again")
        served = time.monotonic() - t0
        time.sleep(0.5)
        stop_file.touch()
        out, _ = reader.communicate(timeout=60)
        result: dict[str, Any] = json.loads(out)
        reader = None
        assert not result["errors"], result
        procs = live_pids_mentioning(str(api_socket))
        (listed,) = again.system_get("/api/v1/daemons")
        assert procs == [listed["pid"]] and listed["pid"] != daemon["pid"]
        assert sorted(live_pids_mentioning(str(workdir))) == \
            sorted([again.pid or 0, holder_pid or 0, *procs, *spare_pids(stack.root)])
        assert holder.pid() == holder_pid
        print(f"\n[daemon kill -9 with no snapshotter] served again {served:.2f}s after the kill "
              f"(1 s of it with nobody running); reader: {result['ops']} ops, longest "
              f"{result['max_pause'] * 1000:.0f} ms, no error")
        stack.release()
        again.stop()
        assert holder.shutdown()
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        snap.kill9()


def test_snapshotter_killed_after_spawning_a_standby(workdir: Path, image: Image) -> None:
    """``failover_standby``: the snapshotter dies right after it spawned a daemon's warm standby
    (in the background, once the daemon is ready), before recording it. The next start-up kills
    that standby (nothing would ever drive or stop it) and keeps the daemon; a later kill -9 of
    the daemon is failed over with no reader error."""
    stack = Stack(workdir, image, "standby")
    snap = stack.snapshotter(env={CRASH_ENV: STANDBY_SPAWNED})
    snap.start()
    reader = None
    try:
        with contextlib.suppress(grpc.RpcError):  # the crash may beat the answer to Prepare
            stack.pull_and_prepare()
        assert snap._proc is not None and snap._proc._proc is not None
        snap._proc._proc.wait(timeout=30)
        assert f"killing the snapshotter at step {STANDBY_SPAWNED}" in snap.log_tail()
        snap.kill9()
        (sockets,) = (stack.root / "socket").iterdir()
        before = live_pids_mentioning(str(sockets))
        assert len(before) == 2 and not (sockets / "standby.pid").exists(), before  # daemon + standby
        again = stack.snapshotter()
        again.start()
        listed = again.system_get("/api/v1/daemons")
        holder_pid = SessionHolder(stack.root).pid()
        # the standby is gone; the daemon too if its image was not recorded before the crash
        assert live_pids_mentioning(str(sockets)) == [d["pid"] for d in listed], (before, listed)
        mnt = stack.prepare_container("container-2")  # containerd asks again / a new container
        (listed_daemon,) = again.system_get("/api/v1/daemons")
        if listed:
            assert listed_daemon["pid"] == listed[0]["pid"]  # the daemon was kept
        assert sorted(live_pids_mentioning(str(workdir))) == \
            sorted([again.pid or 0, holder_pid or 0, *live_pids_mentioning(str(stack.root / "socket")),
                    *spare_pids(stack.root)])
        assert len(live_pids_mentioning(str(stack.root / "socket"))) in (1, 2)  # + a new standby
        stop_file = workdir / "stop-reader"
        want = hashlib.sha256(BIG).hexdigest()
        reader = subprocess.Popen([sys.executable, str(READER), str(mnt), want, "120", str(stop_file)],
                                  stdout=subprocess.PIPE)  # fmt: skip
        time.sleep(0.5)
        os.kill(listed_daemon["pid"], signal.SIGKILL)
        old_pid = listed_daemon["pid"]
        wait_until(lambda: [d["pid"] for d in again.system_get("/api/v1/daemons")] not in ([], [old_pid]),
                   30, "the failover")  # fmt: skip
        time.sleep(0.5)
        stop_file.touch()
        out, _ = reader.communicate(timeout=60)
        reader = None
        result = json.loads(out)
        assert not result["errors"], result
        print(f"\n[standby spawned, snapshotter kill -9] processes at the crash {before}, after the "
              f"restart {[d['pid'] for d in listed]}; later failover: {result['ops']} reader ops, no error")
        stack.release()
        again.stop()
        SessionHolder(stack.root).shutdown(force=True)
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        snap.kill9()
