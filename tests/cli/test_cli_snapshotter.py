"""``containerd-nydus-grpc`` run as a subprocess, the way systemd or a test harness runs it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import nydus_core
from nydus_core import labels as L
from nydus_core.control.snapshot.model import Mount
from nydus_core.testing.client import SnapshotterClient
from nydus_core.testing.services import snapshotter_executable, unmount_below, wait_until

REPO = Path(__file__).resolve().parents[2]
MINI_NYDUSD = REPO / "tests" / "daemon" / "mini_nydusd.py"


class Snapshotter:
    """One ``containerd-nydus-grpc`` process with its stdout/stderr captured to files."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.out = workdir / f"stdout-{time.monotonic_ns()}"
        self.err = self.out.with_name(self.out.name.replace("stdout", "stderr"))
        self.argv = [snapshotter_executable(), *args]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def wait_socket(self, address: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}: {self.stderr()} {self.stdout()}")
            if address.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(address))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise AssertionError(f"no socket at {address} after {timeout}s: {self.stderr()} {self.stdout()}")

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nyd-cli-"))  # short: sockets live inside
    yield d
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[list[Snapshotter]]:
    started: list[Snapshotter] = []
    yield started
    for p in started:
        p.stop()


def run(
    workdir: Path, procs: list[Snapshotter], *args: str, env: dict[str, str] | None = None
) -> Snapshotter:
    p = Snapshotter(workdir, *args, env=env)
    procs.append(p)
    return p


def write_config(workdir: Path, text: str) -> Path:
    path = workdir / "config.toml"
    path.write_text(text)
    return path


def log_file(root: Path) -> Path:
    return root / "logs" / "nydus-snapshotter.log"


# --------------------------------------------------------------------------------------------


def test_version() -> None:
    out = subprocess.run([snapshotter_executable(), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"containerd-nydus-grpc (nydus-core) {nydus_core.__version__}"
    assert lines[1].startswith(f"Python {sys.version.split()[0]} ")
    assert "Plugins:" in lines
    version = nydus_core.__version__
    assert f"  nydus_core.control.snapshot.overlay_mounts (builtin, nydus-core {version})" in lines


def test_list_plugins() -> None:
    env = {**os.environ, "NYDUS_CORE_PLUGINS_DENY": "overlay_mounts"}
    out = subprocess.run([snapshotter_executable(), "--list-plugins"], capture_output=True, text=True,
                         timeout=60, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DETAILS"]
    rows = [line.split(None, 4) for line in lines[1:] if not line.startswith("config")]
    by_name = {row[1]: row for row in rows}
    version = nydus_core.__version__
    assert by_name["nydus"][:4] == ["format", "nydus", "nydus-core", version]
    assert by_name["nydus-native"][:4] == ["decoder", "nydus-native", "nydus-core", version]
    assert by_name["nydus_core.control.credentials.labels"][0] == "other"
    denied = by_name["nydus_core.control.snapshot.overlay_mounts"]
    assert denied[0] == "denied" and "NYDUS_CORE_PLUGINS_DENY" in denied[4]


def test_socket_and_log_file(workdir: Path, procs: list[Snapshotter]) -> None:
    root, sock = workdir / "root", workdir / "run" / "nydus.sock"
    config = write_config(workdir, "version = 1\n")
    p = run(workdir, procs, "--config", str(config), "--root", str(root), "--address", str(sock))
    p.wait_socket(sock)
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0) or os.geteuid() != 0
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700

    log = log_file(root)
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    # "ready" is logged just after the socket appears, not before it.
    wait_until(lambda: " ready" in log.read_text(), 5, "the ready line in the log")
    text = log.read_text()
    assert f"configuration file: {config}" in text
    assert f"root {root}, address {sock}" in text
    assert "plugins loaded: nydus_core.control.snapshot.overlay_mounts (builtin, nydus-core " in text
    assert " ready" in text
    assert p.stdout() == ""  # everything went to the file
    # RPCs are logged at debug level only
    with SnapshotterClient(sock) as client:
        client.prepare("k1")
    p.stop()
    assert "Prepare(" not in log.read_text()


def test_rpcs_logged_at_debug(workdir: Path, procs: list[Snapshotter]) -> None:
    root, sock = workdir / "root", workdir / "s.sock"
    p = run(workdir, procs, "--root", str(root), "--address", str(sock), "--log-level", "debug")
    p.wait_socket(sock)
    secret = "hunter2-do-not-log"
    with SnapshotterClient(sock) as client:
        client.prepare("k1", labels={L.PULL_SECRET: secret, "a": "b"})
        with pytest.raises(grpc.RpcError):
            client.stat("missing")
    p.stop()
    text = log_file(root).read_text()
    assert "DEBUG nydus_core.rpc: Prepare('k1', '', {" in text
    assert "-> [Mount(type='bind'" in text
    assert "DEBUG nydus_core.rpc: Stat('missing') failed after" in text
    assert "NotFound" in text
    assert secret not in text


def test_log_to_stdout(workdir: Path, procs: list[Snapshotter]) -> None:
    root, sock = workdir / "root", workdir / "s.sock"
    p = run(workdir, procs, "--root", str(root), "--address", str(sock), "--log-to-stdout")
    p.wait_socket(sock)
    p.stop()
    assert "INFO nydus_core.cli.snapshotter: ready" in p.stdout()
    assert not log_file(root).exists()


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ('version = 1\n[daemon]\nfs_driver = "Foo!"\n', "daemon.fs_driver", "'Foo!' is not a backend name"),
        ("version = 1\n[daemon]\nthreads_number = 4096\n", "daemon.threads_number", "out of range"),
        ('root = "/tmp/x"\n', "version", "missing"),
        ('version = 1\nroot = "/tmp/' + "x" * 70 + '"\n', "root", "at most 70"),
        ("version = 1\n[log]\nlevel = 3\n", "log.level", "expected a string"),
    ],
)
def test_bad_config_one_line_error(workdir: Path, text: str, key: str, needle: str) -> None:
    config = write_config(workdir, text)
    out = subprocess.run(
        [snapshotter_executable(), "--config", str(config), "--root", str(workdir / "root")]
        if key != "root"
        else [snapshotter_executable(), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("containerd-nydus-grpc: error: invalid configuration: ")
    assert f"{config}: {key}: " in lines[0]
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


def test_not_toml_and_missing_file(workdir: Path) -> None:
    for config, needle in ((write_config(workdir, "version = = 1"), "not valid TOML"),
                           (workdir / "nope.toml", "configuration file not found")):  # fmt: skip
        out = subprocess.run(
            [snapshotter_executable(), "--config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1
        assert len(out.stderr.strip().splitlines()) == 1
        assert str(config) in out.stderr and needle in out.stderr


def test_bad_flag_value_is_refused(workdir: Path) -> None:
    out = subprocess.run(
        [snapshotter_executable(), "--root", "/tmp/" + "r" * 80], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert out.stderr.strip().startswith(
        "containerd-nydus-grpc: error: invalid configuration: command line: root:"
    )
    out = subprocess.run(
        [snapshotter_executable(), "--fs-driver", "zfs/1", "--root", str(workdir / "r")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "command line: daemon.fs_driver: 'zfs/1' is not a backend name" in out.stderr


@pytest.mark.parametrize(("driver", "hint"), [("fscache", "pip install 'nydus-core[erofs]'"),
                                              ("zfs", "install the plugin distribution that provides it")])
def test_configured_backend_not_installed(workdir: Path, driver: str, hint: str) -> None:
    """An fs_driver the user configured that no installed plugin provides stops start-up, saying
    what is installed and what to install; the socket is never created."""
    sock = workdir / "s.sock"
    out = subprocess.run(
        [snapshotter_executable(), "--fs-driver", driver, "--root", str(workdir / "r"),
         "--address", str(sock)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"containerd-nydus-grpc: error: invalid configuration: fs_driver {driver!r}")
    assert "installed backends: " in line and hint in line
    assert not sock.exists()


def test_unknown_key_warning_in_log(workdir: Path, procs: list[Snapshotter]) -> None:
    root, sock = workdir / "root", workdir / "s.sock"
    config = write_config(workdir, "version = 1\nenable_magic = true\n[daemon]\nturbo = 1\n")
    p = run(workdir, procs, "--config", str(config), "--root", str(root), "--address", str(sock))
    p.wait_socket(sock)
    text = log_file(root).read_text()
    assert f"WARNING nydus_core.config: {config}: unknown configuration key enable_magic (ignored)" in text
    assert f"{config}: unknown configuration key daemon.turbo (ignored)" in text
    # logged once, and before the start-up lines (it happened first)
    assert text.count("daemon.turbo") == 1
    assert text.index("daemon.turbo") < text.index("starting (pid")


def test_flags_override_the_file(workdir: Path, procs: list[Snapshotter]) -> None:
    file_root, flag_root = workdir / "file-root", workdir / "flag-root"
    file_sock, flag_sock = workdir / "file.sock", workdir / "flag.sock"
    config = write_config(
        workdir,
        f'version = 1\nroot = "{file_root}"\naddress = "{file_sock}"\ndaemon_mode = "shared"\n'
        f'[daemon]\nfs_driver = "fscache"\nrecover_policy = "restart"\n'
        f'[log]\nlevel = "debug"\ndir = "{workdir / "file-logs"}"\n',
    )
    p = run(
        workdir, procs,
        "--config", str(config), "--root", str(flag_root), "--address", str(flag_sock),
        "--daemon-mode", "multiple", "--fs-driver", "fusedev", "--recover-policy", "none",
        "--log-dir", str(workdir / "flag-logs"), "--log-level", "info",
    )  # fmt: skip
    p.wait_socket(flag_sock)
    assert not file_sock.exists()
    assert (flag_root / "metadata.db").exists()
    assert not file_root.exists()
    text = (workdir / "flag-logs" / "nydus-snapshotter.log").read_text()
    assert not (workdir / "file-logs").exists()
    assert f"root {flag_root}, address {flag_sock}, daemon_mode dedicated, fs_driver fusedev, " in text
    assert "fs_driver fusedev, recover_policy none" in text
    assert " DEBUG " not in text  # --log-level info won over the file's debug


def test_sigterm_stops_within_a_second(workdir: Path, procs: list[Snapshotter]) -> None:
    root, sock = workdir / "root", workdir / "s.sock"
    p = run(workdir, procs, "--root", str(root), "--address", str(sock))
    p.wait_socket(sock)
    with SnapshotterClient(sock) as client:
        client.prepare("k1")
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    code = p.wait(10)
    elapsed = time.monotonic() - t0
    assert code == 0
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert not sock.exists()
    text = log_file(root).read_text()
    assert "received SIGTERM, stopping" in text
    assert "metastore closed" in text
    # the metastore was closed cleanly: a new process opens it and sees the snapshot
    p2 = run(workdir, procs, "--root", str(root), "--address", str(sock))
    p2.wait_socket(sock)
    with SnapshotterClient(sock) as client:
        assert [i.name for i in client.list()] == ["k1"]
    p2.proc.send_signal(signal.SIGINT)
    assert p2.wait(10) == 0
    assert "received SIGINT, stopping" in log_file(root).read_text()


def test_socket_cannot_be_bound(workdir: Path) -> None:
    blocker = workdir / "file"
    blocker.write_text("not a directory")
    for address in (blocker / "s.sock", blocker):
        out = subprocess.run(
            [snapshotter_executable(), "--root", str(workdir / "root"), "--address", str(address)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith(f"containerd-nydus-grpc: error: cannot listen on {address}: ")
    assert blocker.read_text() == "not a directory"


def test_socket_in_use_by_another_snapshotter(workdir: Path, procs: list[Snapshotter]) -> None:
    sock = workdir / "s.sock"
    first = run(workdir, procs, "--root", str(workdir / "r1"), "--address", str(sock))
    first.wait_socket(sock)
    out = subprocess.run(
        [snapshotter_executable(), "--root", str(workdir / "r2"), "--address", str(sock)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "another process is serving on it" in out.stderr
    # the first one still serves
    with SnapshotterClient(sock) as client:
        assert client.list() == []


def test_nydus_snapshotter_started_and_stopping_in_subprocess(
    workdir: Path, procs: list[Snapshotter]
) -> None:
    """The event hooks fire in the console script (a plugin given via an entry point-less path:
    NYDUS_CORE_TRACE_HOOKS shows the calls in the log)."""
    root, sock = workdir / "root", workdir / "s.sock"
    p = run(workdir, procs, "--root", str(root), "--address", str(sock), env={"NYDUS_CORE_TRACE_HOOKS": "1"})
    p.wait_socket(sock)
    wait_until(lambda: " ready" in log_file(root).read_text(), 5, "the ready line in the log")
    p.stop()
    text = log_file(root).read_text()
    started = text.index("call nydus_snapshotter_started(")
    assert text.index("serving snapshots API on") < started < text.index(" ready")
    stopping = text.index("call nydus_snapshotter_stopping(")
    assert text.index("stopped serving") < stopping < text.index("metastore closed")


# --------------------------------------------------------------------------------------------
# Daemons survive the snapshotter
# --------------------------------------------------------------------------------------------


def _pids_with(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class ImageSetup:
    """A snapshotter subprocess serving one nydus image through the stand-in daemon."""

    def __init__(self, workdir: Path, procs: list[Snapshotter]) -> None:
        if not MINI_NYDUSD.exists():
            pytest.skip("tests/daemon/mini_nydusd.py (the daemon engineer's stand-in nydusd) is not there")
        if os.geteuid() != 0:
            pytest.skip("the stand-in daemon serves images with real mounts")
        self.workdir, self.procs = workdir, procs
        self.root, self.sock = workdir / "root", workdir / "s.sock"
        wrapper = workdir / "mini-nydusd"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {MINI_NYDUSD} "$@"\n')
        wrapper.chmod(0o755)
        self.args = (
            "--root", str(self.root), "--address", str(self.sock), "--nydusd-path", str(wrapper),
            "--nydusd-config", str(workdir / "no-template.json"), "--log-level", "debug",
        )  # fmt: skip

    def start(self) -> Snapshotter:
        p = run(self.workdir, self.procs, *self.args)
        p.wait_socket(self.sock)
        return p

    def serve_image(self) -> tuple[list[Mount], Path]:
        """Commit a nydus meta layer, prepare a container on it; its mounts and the image dir."""
        with SnapshotterClient(self.sock) as client:
            meta_labels = {L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: "docker.io/library/busybox:latest"}
            [bind] = client.prepare("meta-active", labels=meta_labels)
            boot = Path(bind.source) / "image" / "image.boot"
            boot.parent.mkdir()
            boot.write_text(json.dumps({"files": {"etc/hello": "from the image\n"}}))
            client.commit("meta", "meta-active", labels=meta_labels)
            mounts = client.prepare("container", parent="meta")
        assert mounts[0].type == "overlay"
        lower = next(o for o in mounts[0].options if o.startswith("lowerdir=")).removeprefix("lowerdir=")
        image_dir = Path(lower.split(":")[0])
        assert (image_dir / "etc" / "hello").read_text() == "from the image\n"
        return mounts, image_dir

    def daemons(self) -> list[int]:
        """The stand-in daemons of this root: an API socket under ``<root>/socket/``, as the
        snapshotter tells them apart. Not the spare daemon (``[daemon] spare_daemon``, socket
        ``<root>/spare/api.sock``): the stand-in has no spare mode, so each spare exits at once,
        but one may be alive for a moment when counted."""
        return [pid for pid in _pids_with(str(MINI_NYDUSD)) if _mentions(pid, f"{self.root / 'socket'}/")]

    def kill_daemons(self) -> None:
        pids = self.daemons()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.05)


def _mentions(pid: int, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def image_setup(workdir: Path, procs: list[Snapshotter]) -> Iterator[ImageSetup]:
    setup = ImageSetup(workdir, procs)
    yield setup
    for p in procs:
        p.stop()
    setup.kill_daemons()


def test_daemon_survives_snapshotter_stop_and_is_readopted(image_setup: ImageSetup) -> None:
    p = image_setup.start()
    mounts, image_dir = image_setup.serve_image()
    daemons = image_setup.daemons()
    assert len(daemons) == 1
    # its own session: a signal to the snapshotter's process group does not reach it
    assert os.getsid(daemons[0]) != os.getsid(p.proc.pid)

    p.proc.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    time.sleep(0.3)
    os.kill(daemons[0], 0)  # still alive
    assert (image_dir / "etc" / "hello").read_text() == "from the image\n"
    assert "daemons left running: 1" in log_file(image_setup.root).read_text()

    # a new snapshotter re-adopts it instead of starting another one
    image_setup.start()
    assert "daemon manager open: 1 daemon(s) recovered" in log_file(image_setup.root).read_text()
    with SnapshotterClient(image_setup.sock) as client:
        assert client.mounts("container") == mounts
    assert image_setup.daemons() == daemons


def test_dead_daemon_is_respawned_by_the_liveness_sweep(image_setup: ImageSetup) -> None:
    image_setup.start()
    _mounts, image_dir = image_setup.serve_image()
    [pid] = image_setup.daemons()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15  # one sweep every 5 s, plus the respawn
    while time.monotonic() < deadline:
        alive = [p for p in image_setup.daemons() if p != pid and Path(f"/proc/{p}").exists()]
        if alive:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the killed daemon was not respawned: " + log_file(image_setup.root).read_text())
    assert "daemon liveness checked every 5s" in log_file(image_setup.root).read_text()
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until:
        try:
            if (image_dir / "etc" / "hello").read_text() == "from the image\n":
                break
        except OSError:
            pass
        time.sleep(0.2)
    assert (image_dir / "etc" / "hello").read_text() == "from the image\n"


@pytest.mark.parametrize("installed", [True, False], ids=["stargz-plugin", "stargz-plugin-denied"])
def test_enable_stargz_flag(workdir: Path, procs: list[Snapshotter], installed: bool) -> None:
    """``--enable-stargz`` sets ``[experimental] enable_stargz``; without a plugin providing the
    estargz format it is warned about (with the extra to install), never silently ignored."""
    root, sock = workdir / "root", workdir / "s.sock"
    env = {} if installed else {"NYDUS_CORE_PLUGINS_DENY": "stargz"}
    p = run(workdir, procs, "--root", str(root), "--address", str(sock), "--enable-stargz", env=env)
    p.wait_socket(sock)
    text = log_file(root).read_text()
    warned = "enable_stargz is set but no installed plugin provides the estargz format" in text
    assert warned is not installed, text[-2000:]
    if not installed:
        assert "pip install 'nydus-core[stargz]'" in text
