"""Hot upgrade through the system controller of a real ``containerd-nydus-grpc`` (root, real mounts).

The snapshotter runs with ``recover_policy = "failover"`` and serves a nydus image (built here,
blobs on a localfs backend, no registry) to a "container" prepared over its gRPC socket. A reader
process (``failover_reader.py``, like a container) reads a file whole in a loop and lists a
directory, while ``PUT /api/v1/daemons/upgrade`` moves the daemon onto **another program**: a
wrapper generated here that runs nydusd-py but reports a different ``package_ver`` (it patches
``nydus_core.data.runtime.__version__`` before nydusd-py's ``main``; nothing in production code knows
about it). Checked: no reader error and right bytes, ``GET /api/v1/daemon`` reports the old
version before and the new one after, the old pid is gone, the mount never went away,
``GET /api/v1/daemons`` lists the new pid, and a later ``kill -9`` fails over to the new program.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuse_helpers import fuse_pm, fusedev, nydusd_py
from nydus_fuse.backend.crash_points import UPGRADE_STEPS

from nydus_core import labels as L
from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.mounts import is_mounted
from nydus_core.faults import CRASH_ENV
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.images import Image, build_image
from nydus_core.testing.services import NydusSnapshotter, live_pids_mentioning, process_alive, unmount_below

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE mounts)")

BIG = os.urandom((2 << 20) + 4321)
FILES = {"big": BIG, **{f"d/f{i}": str(i).encode() * i for i in range(10)}}
REF = "localhost/test/upgrade:latest"
NEW_VERSION = "0.1.0+hot-upgrade-test"
READER = Path(__file__).with_name("failover_reader.py")


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nyup-", dir="/tmp"))  # short: unix socket paths
    yield d
    for pid in live_pids_mentioning(str(d)):  # daemons we started name the workdir in their argv
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


def write_program(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def upgraded_nydusd(workdir: Path) -> Path:
    """Another daemon program: nydusd-py reporting ``package_ver`` ``nydusd-py NEW_VERSION``."""
    return write_program(workdir / "nydusd-next", (
        f"#!{sys.executable}\n"
        "import sys\n"
        "import nydus_core.data.runtime\n"
        f"nydus_core.data.runtime.__version__ = {NEW_VERSION!r}\n"
        "from nydus_fuse.daemon.main import main\n"
        "sys.exit(main())\n"
    ))  # fmt: skip


def nydusd_dying_at_start(workdir: Path) -> Path:
    """A program that gets through INIT and takeover but dies when told ``start`` -- after the old
    daemon has left: the upgrade must fail the session back to the old program."""
    return write_program(workdir / "nydusd-dies", (
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "import nydus_fuse.daemon.supervised as supervised\n"
        "supervised.Control.start = lambda self: os._exit(7)\n"
        "from nydus_fuse.daemon.main import main\n"
        "sys.exit(main())\n"
    ))  # fmt: skip


class Stack:
    """The snapshotter (failover, system socket) serving one image to one prepared container."""

    def __init__(
        self, workdir: Path, mode: str, recover_policy: str = "failover", env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        mode, _, extra = mode.partition("+")
        standby = extra == "standby"  # [daemon] failover_standby: a warm next generation per daemon
        self.image: Image = build_image(workdir / "img", FILES)
        template = workdir / "nydusd-config.json"
        template.write_text(json.dumps({
            "device": {"backend": {"type": "localfs", "config": {"dir": str(self.image.blob_dir)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": ""}}},
            "mode": "direct", "digest_validate": False, "fs_prefetch": {"enable": False},
        }))  # fmt: skip
        config = workdir / "config.toml"
        system = workdir / "system.sock"
        config.write_text(
            f'version = 1\ndaemon_mode = "{mode}"\n\n[system]\nenable = true\naddress = "{system}"\n\n'
            f'[daemon]\nnydusd_path = "{nydusd_py()}"\nnydusd_config = "{template}"\n'
            f'recover_policy = "{recover_policy}"\n'
            + ("failover_standby = true\n" if standby else "")
        )
        self.config, self.system = config, system
        self.snap = self.snapshotter(env)
        self.snap.start()
        self.client = SnapshotterClient(self.snap.address)

    def snapshotter(self, env: dict[str, str] | None = None) -> NydusSnapshotter:
        return NydusSnapshotter(self.workdir / "s", self.workdir / "s" / "grpc.sock", root=self.workdir / "r",
                                extra_args=["--config", str(self.config)], system_address=self.system,
                                env=env)  # fmt: skip

    def serve_image(self) -> Path:
        """Pull (as containerd would: skip the blob, unpack the bootstrap) and prepare a container;
        returns the image's mountpoint, served by a daemon."""
        cri = {L.CRI_IMAGE_REF: REF}
        with pytest.raises(grpc.RpcError) as err:
            blob_labels = {L.TARGET_SNAPSHOT_REF: "sha256:blob", L.NYDUS_BLOB: "true", **cri}
            self.client.prepare("extract-1 sha256:blob", "", blob_labels)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        meta_labels = {L.TARGET_SNAPSHOT_REF: "sha256:meta", L.NYDUS_BOOTSTRAP: "true", **cri}
        (m,) = self.client.prepare("extract-2 sha256:meta", "sha256:blob", meta_labels)
        upper = (
            m.source
            if m.type == "bind"
            else next(o.split("=", 1)[1] for o in m.options if o.startswith("upperdir="))
        )
        boot = Path(upper) / "image" / "image.boot"
        boot.parent.mkdir(parents=True)
        shutil.copyfile(self.image.bootstrap, boot)
        self.client.commit("sha256:meta", "extract-2 sha256:meta", meta_labels)
        (rootfs,) = self.client.prepare("container-1", "sha256:meta")
        lower = next(o.split("=", 1)[1] for o in rootfs.options if o.startswith("lowerdir="))
        return Path(lower.split(":")[0])

    def daemon(self) -> dict[str, Any]:
        (d,) = self.snap.system_get("/api/v1/daemons")
        assert isinstance(d, dict)
        return d

    def close(self) -> None:
        self.client.close()
        self.snap.stop()


@pytest.fixture
def stack_factory(workdir: Path) -> Iterator[Any]:
    made: list[Stack] = []

    def make(mode: str, recover_policy: str = "failover", env: dict[str, str] | None = None) -> Stack:
        made.append(Stack(workdir, mode, recover_policy, env))
        return made[-1]

    yield make
    for s in made:
        s.close()


def package_ver(api_socket: str) -> str:
    """``version.package_ver`` of ``GET /api/v1/daemon`` on a daemon's own API socket."""
    with NydusdClient(Path(api_socket), timeout=5) as c:
        return str(c.daemon_info().version.get("package_ver", ""))


class MountWatch:
    """Samples mountinfo every 2 ms and remembers whether `mountpoint` was ever missing."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.missing = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.samples += 1
            if not is_mounted(self.mountpoint):
                self.missing += 1

    def __enter__(self) -> MountWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_reader(mnt: Path, seconds: float, stop_file: Path | None = None) -> subprocess.Popen[bytes]:
    want = hashlib.sha256(BIG).hexdigest()
    argv = [
        sys.executable,
        str(READER),
        str(mnt),
        want,
        str(seconds),
        *([str(stop_file)] if stop_file else []),
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


def reader_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    result: dict[str, Any] = json.loads(out)
    return result


def wait_new_pid(stack: Stack, old: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            d = stack.daemon()
            if d["pid"] != old and process_alive(d["pid"]) and package_ver(d["api_socket"]):
                return d
        assert time.monotonic() < deadline, f"no new daemon within {timeout}s:\n{stack.snap.log_tail()}"
        time.sleep(0.01)


def standby_of(socket_dir: Path, timeout: float = 30.0, not_pid: int = 0) -> tuple[int, list[str]]:
    """The recorded warm standby (``standby.pid`` beside the API sockets) once it runs: pid, argv."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            pid = int((socket_dir / "standby.pid").read_text().split()[0])
            if pid != not_pid and process_alive(pid):
                return pid, _cmdline(pid)
        assert time.monotonic() < deadline, "no standby"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["dedicated", "shared", "dedicated+standby"])
def test_nydus_daemon_upgrade_under_read_load(mode: str, workdir: Path, stack_factory: Any) -> None:
    stack: Stack = stack_factory(mode)
    mnt = stack.serve_image()
    assert (mnt / "big").read_bytes() == BIG
    before = stack.daemon()
    old_pid, old_sock = before["pid"], before["api_socket"]
    old_ver = package_ver(old_sock)
    program = upgraded_nydusd(workdir)
    daemon_mnt = Path(before["mountpoint"])  # the daemon's FUSE mount (shared: <root>/mnt)
    standby = mode.endswith("+standby")
    old_standby = standby_of(Path(old_sock).parent)[0] if standby else 0
    readers: list[subprocess.Popen[bytes]] = []
    try:
        with MountWatch(daemon_mnt) as watch:
            readers.append(start_reader(mnt, 4.0))  # the upgrade runs within these 4 s
            time.sleep(0.5)
            t = time.monotonic()
            status, answer = stack.snap.system_put("/api/v1/daemons/upgrade", {"nydusd_path": str(program)})
            took = time.monotonic() - t
            assert status == 200, (answer, stack.snap.log_tail())
            after = stack.daemon()
            new_pid, new_sock = after["pid"], after["api_socket"]
            new_ver = package_ver(new_sock)
            new_argv = _cmdline(new_pid)
            old_gone = not process_alive(old_pid)
            old_sock_gone = not Path(old_sock).exists()
            result = reader_result(readers[0])
            # with a standby: the old program's standby is replaced by one of the new program
            new_standby, standby_argv = 0, list[str]()
            if standby:
                new_standby, standby_argv = standby_of(Path(new_sock).parent, not_pid=old_standby)
            # kill -9 of the upgraded daemon: failover respawns the *new* program
            readers.append(start_reader(mnt, 3.0))
            time.sleep(0.5)
            os.kill(new_pid, signal.SIGKILL)
            failed_over = wait_new_pid(stack, new_pid)
            after_kill = reader_result(readers[1])
    finally:
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait()
    assert not result["errors"], result
    assert not after_kill["errors"], after_kill
    assert result["ops"] > 0 and after_kill["ops"] > 0
    assert watch.samples > 0 and watch.missing == 0, "the mount went away during the upgrade"
    assert old_ver == "nydusd-py 0.1.0" and new_ver == f"nydusd-py {NEW_VERSION}", (old_ver, new_ver)
    (entry,) = answer["upgraded"]
    assert entry["old_pid"] == old_pid and entry["pid"] == new_pid and entry["program"] == str(program)
    assert entry["version"] == new_ver
    assert new_pid != old_pid and old_gone
    assert str(program) in new_argv[:2] and "--upgrade" in new_argv
    assert new_sock != old_sock and old_sock_gone
    assert Path(new_sock).name == "api1.sock"
    assert str(program) in _cmdline(failed_over["pid"])[:2]
    assert package_ver(failed_over["api_socket"]) == new_ver
    if standby:
        assert not process_alive(old_standby) and str(program) in standby_argv[:2]
        assert failed_over["pid"] == new_standby  # the new program's standby took over
    records = stack.snap.system_get("/api/v1/daemons/records")
    assert records[0]["program"] == str(program) and records[0]["pid"] == failed_over["pid"]
    daemon_log = stack.snap.log_path.read_text()  # --log-to-stdout: the daemons log there too
    assert daemon_log.count("sent FUSE_NOTIFY_RESEND") >= 2  # the upgrade's start and the failover
    assert (mnt / "big").read_bytes() == BIG
    steps = [ln.split("upgraded to", 1)[1].strip() for ln in daemon_log.splitlines() if "upgraded to" in ln]
    print(f"\n[hot upgrade {mode}] {old_ver} (pid {old_pid}) -> {new_ver} (pid {new_pid}), PUT took "
          f"{took * 1000:.0f} ms; longest reader op during the upgrade {result['max_pause'] * 1000:.0f} ms "
          f"over {result['ops']} ops, no error; snapshotter: {steps[-1] if steps else '?'}; kill -9 "
          f"afterwards failed over to pid {failed_over['pid']} running {program.name}, longest reader op "
          f"{after_kill['max_pause'] * 1000:.0f} ms, no error")  # fmt: skip


@pytest.mark.parametrize("mode", ["dedicated"])
def test_nydus_daemon_upgrade_to_a_failing_program_keeps_a_daemon_serving(
    mode: str, workdir: Path, stack_factory: Any
) -> None:
    """Two programs that cannot take over: one exits at once, one reports another version than
    the request asks for; each time the new process is killed and the old daemon keeps serving.
    A third dies at ``start``, after the old daemon left: the old program is failed back to.
    Readers see no error throughout."""
    stack: Stack = stack_factory(mode)
    mnt = stack.serve_image()
    before = stack.daemon()
    broken = write_program(workdir / "nydusd-broken", "#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    other = upgraded_nydusd(workdir)
    dying = nydusd_dying_at_start(workdir)
    reader = start_reader(mnt, 6.0)
    try:
        time.sleep(0.3)
        status, answer = stack.snap.system_put("/api/v1/daemons/upgrade", {"nydusd_path": str(broken)})
        assert status == 500, answer
        assert "keeps serving" in answer["message"] and "exited with status 3" in answer["message"], answer
        status, wrong = stack.snap.system_put("/api/v1/nydusd/upgrade",
                                              {"nydusd_path": str(other), "version": "9.9.9"})  # fmt: skip
        assert status == 500, wrong
        assert "not '9.9.9'" in wrong["message"] and "keeps serving" in wrong["message"], wrong
        kept = stack.daemon()
        kept_ver = package_ver(kept["api_socket"])
        sockets = sorted(p.name for p in Path(before["api_socket"]).parent.iterdir())
        leftovers = live_pids_mentioning(str(other))
        status, back = stack.snap.system_put("/api/v1/daemons/upgrade", {"nydusd_path": str(dying)})
        result = reader_result(reader)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert not result["errors"], result
    assert kept["pid"] == before["pid"] and kept["api_socket"] == before["api_socket"]
    assert kept_ver == "nydusd-py 0.1.0"
    assert not leftovers, "the refused new daemon was left running"
    assert sockets == ["api.sock"], sockets
    assert status == 500, back
    assert "after the old daemon exited" in back["message"], back
    assert f"{nydusd_py()} serves again" in back["message"], back
    failed_back = stack.daemon()
    assert failed_back["pid"] != before["pid"] and not process_alive(before["pid"])
    assert failed_back["api_socket"] == before["api_socket"]
    assert str(nydusd_py()) in " ".join(_cmdline(failed_back["pid"])[:2])
    assert package_ver(failed_back["api_socket"]) == "nydusd-py 0.1.0"
    assert (mnt / "big").read_bytes() == BIG
    pause = result["max_pause"] * 1000
    print(f"\n[upgrade refused twice, then failed back] old program serves (pid {failed_back['pid']}); "
          f"longest reader op {pause:.0f} ms over {result['ops']} ops, no error")  # fmt: skip


def test_nydus_daemon_upgrade_survives_a_snapshotter_restart(workdir: Path, stack_factory: Any) -> None:
    """The upgraded daemon's record (program, API socket) is what a restarted snapshotter reads:
    it re-adopts the daemon on ``api1.sock`` and a kill -9 afterwards still respawns the new
    program on the same mount, while a reader keeps going."""
    stack: Stack = stack_factory("dedicated")
    mnt = stack.serve_image()
    program = upgraded_nydusd(workdir)
    status, answer = stack.snap.system_put("/api/v1/daemons/upgrade", {"nydusd_path": str(program)})
    assert status == 200, answer
    upgraded = stack.daemon()
    stack.snap.restart()
    readopted = stack.daemon()
    assert (readopted["pid"], readopted["api_socket"]) == (upgraded["pid"], upgraded["api_socket"])
    reader = start_reader(mnt, 3.0)
    try:
        time.sleep(0.5)
        os.kill(readopted["pid"], signal.SIGKILL)
        again = wait_new_pid(stack, readopted["pid"])
        result = reader_result(reader)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert not result["errors"], result
    assert str(program) in _cmdline(again["pid"])[:2]
    assert package_ver(again["api_socket"]) == f"nydusd-py {NEW_VERSION}"
    assert is_mounted(Path(again["mountpoint"]))
    print(f"\n[upgrade, snapshotter restart, kill -9] {program.name} respawned as pid {again['pid']}; "
          f"longest reader op {result['max_pause'] * 1000:.0f} ms, no error")  # fmt: skip


def test_nydus_daemon_upgrade_one_at_a_time_and_not_taken_for_a_death(workdir: Path) -> None:
    """Through the `DaemonManager` with its liveness monitor on (shared daemon, two images): while
    an upgrade runs (its new program starts slowly) a second one is refused (`UpgradeBusy`, the
    controller's 409), and the old daemon's exit is not taken for a death: the only events are
    ``upgraded``, no ``died`` / ``recovered``, and both images are served by the new process."""
    import attrs
    from test_nydusd_py_manager import _config, _meta

    from nydus_core.control.daemons.manager import DaemonManager, UpgradeBusy
    from nydus_core.hookspecs import hookimpl

    events: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        @hookimpl
        def nydus_daemon_event(self, daemon: Any, event: str, detail: Any) -> None:
            events.append((event, dict(detail)))

    img = build_image(workdir / "build", FILES)
    base = _config(workdir, img.blob_dir, "shared")
    config = attrs.evolve(base, daemon=attrs.evolve(base.daemon, recover_policy="failover"))
    pm = fuse_pm(Recorder())
    mgr = DaemonManager(config, pm)
    slow_start = f'#!/bin/sh\nsleep 1.5\nexec {upgraded_nydusd(workdir)} "$@"\n'
    slow = write_program(workdir / "nydusd-slow", slow_start)
    try:
        mgr.recover()
        a = mgr.ensure_instance(_meta(workdir, "61", img), {})
        b = mgr.ensure_instance(_meta(workdir, "62", img), {})
        mgr.start_liveness_monitor(interval=0.5)
        (daemon,) = mgr.daemons()
        old_pid = daemon.pid
        events.clear()
        results: list[Any] = []
        first = threading.Thread(target=lambda: results.append(mgr.upgrade(str(slow))))
        first.start()
        time.sleep(0.5)
        with pytest.raises(UpgradeBusy, match="another daemon upgrade is running"):
            mgr.upgrade(str(slow))
        first.join(timeout=60)
        time.sleep(1.5)  # the monitor had time to look at the exited old pid (pidfd) and sweep twice
        (entry,) = results[0]
        assert entry["old_pid"] == old_pid and entry["pid"] == daemon.pid != old_pid
        assert [e for e, _ in events] == ["upgraded"], events
        assert mgr.daemons() == [daemon] and daemon.program == str(slow)
        assert mgr.store.get_daemon(daemon.id) == daemon  # persisted
        for inst in (a, b):
            assert (inst.mountpoint / "big").read_bytes() == BIG
        with NydusdClient(daemon.api_socket) as c:
            assert c.daemon_info().version["package_ver"] == f"nydusd-py {NEW_VERSION}"
        mgr.release_unused(set())
        fusedev(pm).stop(daemon)
    finally:
        mgr.close()


@pytest.mark.parametrize("step", UPGRADE_STEPS)
def test_nydus_daemon_upgrade_interrupted_by_a_snapshotter_crash(
    step: str, workdir: Path, stack_factory: Any
) -> None:
    """The snapshotter is killed -9 at each step of a hot upgrade (test-only fault injection); its
    restart rolls the upgrade back: the new program's process is killed, the old daemon serves
    (or, once it had left, a failover to the *old* program does), one daemon process = record =
    system API, one mount, and the reader never sees an error."""
    stack: Stack = stack_factory("dedicated", env={CRASH_ENV: step})
    mnt = stack.serve_image()
    before = stack.daemon()
    sockets = Path(before["api_socket"]).parent
    program = upgraded_nydusd(workdir)
    stop_file = workdir / "stop-reader"
    reader = start_reader(mnt, 120, stop_file)
    try:
        time.sleep(0.3)
        with contextlib.suppress(OSError):  # the snapshotter dies under the request
            status, _ = stack.snap.system_put("/api/v1/daemons/upgrade", {"nydusd_path": str(program)})
            assert status == 0, "the upgrade answered although the snapshotter was to die"
        assert stack.snap._proc is not None and stack.snap._proc._proc is not None
        stack.snap._proc._proc.wait(timeout=30)
        assert f"killing the snapshotter at step {step}" in stack.snap.log_tail()
        stray = [
            p for p in live_pids_mentioning(str(sockets)) if str(program) in " ".join(_cmdline(p))
        ]
        stack.snap.kill9()  # reap it
        stack.snap = stack.snapshotter()
        stack.snap.start()
        after = wait_new_pid(stack, -1)
        time.sleep(0.5)  # the reader goes on against whatever serves now
        stop_file.touch()
        result = reader_result(reader)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert not result["errors"], result
    assert stray, "the new program was not running when the snapshotter died"
    procs = live_pids_mentioning(str(sockets))
    (record,) = stack.snap.system_get("/api/v1/daemons/records")
    assert procs == [after["pid"]] == [record["pid"]], (procs, after, record, stack.snap.log_tail())
    assert record["program"] == str(nydusd_py()) and str(program) not in " ".join(_cmdline(after["pid"]))
    assert package_ver(after["api_socket"]) == "nydusd-py 0.1.0"
    if step in ("upgrade-spawned", "upgrade-taken-over"):
        assert after["pid"] == before["pid"]  # the old daemon never stopped serving
    else:
        # failed over to the old program
        assert after["pid"] != before["pid"] and not process_alive(before["pid"])
    assert after["api_socket"] == before["api_socket"]
    assert sorted(p.name for p in sockets.iterdir() if p.name.endswith(".sock")) == ["api.sock"]
    assert is_mounted(mnt) and (mnt / "d" / "f7").read_bytes() == b"7" * 7
    how = "same daemon" if after["pid"] == before["pid"] else "failover to the old program"
    pause = result["max_pause"] * 1000
    print(f"\n[snapshotter kill -9 at {step}] rolled back to pid {after['pid']} ({how}); "
          f"longest reader op {pause:.0f} ms over {result['ops']} ops, no error")  # fmt: skip
