"""The backend contract from the manager's side: which `Backend` method is called when, with what.

Two test backends, both real (mounts happen, processes run):

* ``bindfs``: daemon-less; it "serves" an image by bind-mounting the directory its bootstrap names
  (the mini nydusd's JSON bootstrap), as a kernel-mounting backend would;
* ``mini``: the core's `NydusdBackend` driving the stand-in nydusd, wrapped to record calls.

The daemon and manager behaviour every backend relies on (start, wait_ready, stop, attach,
detach, alive, recover, reconcile) is tested in ``test_daemon_manager.py``; here are the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import EventRecorder, kill9, pid_alive

from nydus_core import hookimpl
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.manager import DaemonManager
from nydus_core.control.daemons.model import DaemonRecord, Instance
from nydus_core.control.daemons.mounts import is_mounted, umount_tree
from nydus_core.control.daemons.nydusd import NydusdBackend
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.control.system.controller import list_daemons
from nydus_core.errors import FailedPrecondition
from nydus_core.plugins import NydusPluginManager, build_plugin_manager
from nydus_core.records import Backend, BackendContext, BackendRecord, Capabilities

MakeConfig = Callable[..., SnapshotterConfig]
MakeImage = Callable[..., ImageSource]


class BindBackend(Backend):
    """Daemon-less: attach bind-mounts a directory with the image's files at the mountpoint."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.restore_answer = True

    def open(self, ctx: BackendContext, recorded: Sequence[DaemonRecord]) -> None:
        super().open(ctx, recorded)
        self.calls.append(("open", list(recorded)))

    def close(self) -> None:
        self.calls.append(("close", None))

    def prepare(
        self, instance: Instance, image: ImageSource, labels: Mapping[str, str], daemon: DaemonRecord | None
    ) -> None:
        files = json.loads(image.bootstrap.read_text())["files"]
        src = instance.snapshot_dir / "bindfs"
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        instance.backend_data["source"] = str(src)
        instance.backend_data["labels_seen"] = sorted(labels)
        self.calls.append(("prepare", (instance.snapshot_id, daemon)))

    def attach(self, daemon: DaemonRecord | None, instance: Instance) -> None:
        instance.mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "--bind", instance.backend_data["source"], str(instance.mountpoint)], check=True
        )
        self.calls.append(("attach", (daemon, instance.snapshot_id)))

    def detach(self, daemon: DaemonRecord | None, instance: Instance) -> None:
        umount_tree(instance.mountpoint)
        self.calls.append(("detach", (daemon, instance.snapshot_id)))

    def restore(self, instance: Instance) -> bool:
        self.calls.append(("restore", instance.snapshot_id))
        if not self.restore_answer:
            return False
        if not is_mounted(instance.mountpoint):
            self.attach(None, instance)
        return True

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class RecordingMini(NydusdBackend):
    """The mini daemons, with every manager-level call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.helper: subprocess.Popen[bytes] | None = None
        self.upgrade_blocker = ""

    def open(self, ctx: BackendContext, recorded: Sequence[DaemonRecord]) -> None:
        super().open(ctx, recorded)
        self.calls.append(("open", [d.id for d in recorded]))

    def close(self) -> None:
        self.calls.append(("close", None))

    def watch_pids(self) -> list[int]:
        return [self.helper.pid] if self.helper is not None and self.helper.poll() is None else []

    def sweep(self) -> None:
        self.calls.append(("sweep", time.monotonic()))

    def adopt(self, daemon: DaemonRecord) -> None:
        self.calls.append(("adopt", daemon.id))

    def daemon_event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        self.calls.append(("event", event))

    def describe(self, daemon: DaemonRecord) -> dict[str, Any]:
        return {"supervisor_path": f"/described/{daemon.id}", "mini_backend": True}

    def check_upgrade(self) -> None:
        if self.upgrade_blocker:
            raise FailedPrecondition(self.upgrade_blocker)

    def upgrade(
        self, daemon: DaemonRecord, instances: Sequence[Instance], program: str, version: str
    ) -> None:
        self.calls.append(("upgrade", (daemon.id, [i.snapshot_id for i in instances], program, version)))
        daemon.program, daemon.version = program, version or "upgraded"

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Plugin:
    def __init__(self, bind: BindBackend, mini: RecordingMini, hot_upgrade: bool = True) -> None:
        self.bind, self.mini, self.hot_upgrade = bind, mini, hot_upgrade

    @hookimpl
    def nydus_backends(self) -> Iterator[BackendRecord]:
        yield BackendRecord(name="bindfs", backend=self.bind, capabilities=Capabilities(daemon=False))
        yield BackendRecord(
            name="mini",
            backend=self.mini,
            capabilities=Capabilities(shared_daemon=True, hot_upgrade=self.hot_upgrade),
        )


@pytest.fixture
def bind() -> BindBackend:
    return BindBackend()


@pytest.fixture
def rmini() -> RecordingMini:
    return RecordingMini()


@pytest.fixture
def cpm(bind: BindBackend, rmini: RecordingMini, events: EventRecorder) -> NydusPluginManager:
    return build_plugin_manager([events, Plugin(bind, rmini)], entry_points=False, env={})


# ---------------------------------------------------------------------------------------------
# daemon-less
# ---------------------------------------------------------------------------------------------


def test_backend_prepare(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    cpm: NydusPluginManager,
    bind: BindBackend,
    rmini: RecordingMini,
) -> None:
    """Called once per image with the instance, the image, the meta labels and the serving daemon
    (``None`` without one); what it puts in ``backend_data`` is persisted."""
    mgr = DaemonManager(make_config("dedicated", fs_driver="bindfs"), cpm)
    image = make_image("5", {"a.txt": "A\n"})
    inst = mgr.ensure_instance(image, {"extra": "1"})
    assert ("prepare", ("5", None)) in bind.calls
    assert inst.daemon_id == "" and inst.mountpoint == root / "snapshots" / "5" / "mnt"
    assert (inst.mountpoint / "a.txt").read_text() == "A\n"
    stored = mgr.store.get_instance("5")
    assert stored is not None and stored.backend_data["source"] == str(root / "snapshots" / "5" / "bindfs")
    assert "extra" in stored.backend_data["labels_seen"] and stored.fs_driver == "bindfs"
    # with a daemon, prepare gets the (not yet started) dedicated daemon's record
    other = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    inst2 = other.ensure_instance(make_image("6"), {})
    daemon = other.daemon(inst2.daemon_id)
    assert daemon is not None and inst2.config_path == daemon.config_dir / "config.json"
    assert rmini.names()[:1] == ["open"]
    other.release_unused(set())
    mgr.release_unused(set())


def test_backend_attach_and_detach_without_a_daemon(
    root: Path, make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager, bind: BindBackend
) -> None:
    """A daemon-less backend is asked to attach (``daemon=None``) in whatever daemon_mode, and
    to detach when the image's last snapshot goes; no daemon record is ever made."""
    for mode in ("dedicated", "shared", "none"):
        bind.calls.clear()
        mgr = DaemonManager(make_config(mode, fs_driver="bindfs"), cpm)
        inst = mgr.ensure_instance(make_image(f"1{len(mode)}"), {})
        assert is_mounted(inst.mountpoint) and mgr.daemons() == [] and mgr.store.list_daemons() == []
        assert [c for c in bind.calls if c[0] == "attach"] == [("attach", (None, inst.snapshot_id))]
        mgr.release_unused(set())
        assert ("detach", (None, inst.snapshot_id)) in bind.calls
        assert not is_mounted(inst.mountpoint) and mgr.store.list_instances() == []
        mgr.close()


def test_backend_restore(
    root: Path, make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager, bind: BindBackend
) -> None:
    """Start-up asks the backend to restore every recorded daemon-less image (here after its
    mount was lost, as after a reboot); ``False`` forgets the record."""
    config = make_config("dedicated", fs_driver="bindfs")
    mgr = DaemonManager(config, cpm)
    inst = mgr.ensure_instance(make_image("21"), {})
    mgr.close()
    umount_tree(inst.mountpoint)
    again = DaemonManager(config, cpm)
    again.recover()
    assert ("restore", "21") in bind.calls
    assert is_mounted(inst.mountpoint) and again.get_instance("21") is not None
    again.close()
    bind.restore_answer = False
    third = DaemonManager(config, cpm)
    third.recover()
    assert third.get_instance("21") is None and third.store.get_instance("21") is None
    umount_tree(inst.mountpoint)


def test_backend_open(
    root: Path,
    make_config: MakeConfig,
    make_image: MakeImage,
    cpm: NydusPluginManager,
    bind: BindBackend,
    rmini: RecordingMini,
) -> None:
    """The configured backend is opened at start-up with its recorded daemons; another one only
    when an image (or a record) needs it, once."""
    config = make_config("dedicated", fs_driver="mini")
    mgr = DaemonManager(config, cpm)
    mgr.recover()
    assert rmini.calls == [("open", [])] and bind.calls == []
    mgr.ensure_instance(make_image("31"), {})
    image = make_image("32")
    mgr.ensure_instance(
        ImageSource(format="test", meta_id="32", bootstrap=image.bootstrap, image_ref="x", backend="bindfs"),
        {},
    )
    mgr.ensure_instance(
        ImageSource(format="test", meta_id="32", bootstrap=image.bootstrap, image_ref="x", backend="bindfs"),
        {},
    )
    assert bind.names().count("open") == 1 and rmini.names().count("open") == 1
    assert mgr.get_instance("32") is not None and mgr.get_instance("32").fs_driver == "bindfs"  # type: ignore[union-attr]
    (daemon,) = mgr.daemons()
    mgr.close()
    rmini.calls.clear()
    again = DaemonManager(config, cpm)
    again.recover()
    assert rmini.calls[0] == ("open", [daemon.id])  # it gets the records as persisted
    assert ("restore", "32") in bind.calls  # the bindfs image was recorded: its backend opened too
    again.release_unused(set())


def test_backend_close(
    make_config: MakeConfig,
    make_image: MakeImage,
    cpm: NydusPluginManager,
    bind: BindBackend,
    rmini: RecordingMini,
) -> None:
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    mgr.recover()
    mgr.close()
    assert rmini.names() == ["open", "close"] and bind.calls == []  # never opened, never closed


# ---------------------------------------------------------------------------------------------
# with daemons
# ---------------------------------------------------------------------------------------------


def test_backend_adopt(
    make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager, rmini: RecordingMini
) -> None:
    config = make_config("dedicated", fs_driver="mini")
    mgr = DaemonManager(config, cpm)
    inst = mgr.ensure_instance(make_image("41"), {})
    mgr.close()
    assert "adopt" not in rmini.names()
    again = DaemonManager(config, cpm)
    again.recover()
    assert ("adopt", inst.daemon_id) in rmini.calls
    again.release_unused(set())


def test_backend_daemon_event(
    make_config: MakeConfig,
    make_image: MakeImage,
    cpm: NydusPluginManager,
    rmini: RecordingMini,
    events: EventRecorder,
) -> None:
    """The owning backend hears of each persisted change first, then the broadcast hook."""
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    inst = mgr.ensure_instance(make_image("51"), {})
    mgr.release_unused(set())
    told = [arg for name, arg in rmini.calls if name == "event"]
    assert told == ["started", "ready", "stopped"] == events.names(inst.daemon_id)


def test_backend_describe(make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager) -> None:
    """The system API's daemon entries carry what the owning backend adds (upstream's
    ``supervisor_path`` among it)."""
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    inst = mgr.ensure_instance(make_image("61"), {})
    (entry,) = list_daemons(mgr)
    assert entry["supervisor_path"] == f"/described/{inst.daemon_id}" and entry["mini_backend"] is True
    assert entry["fs_driver"] == "mini" and entry["instances"]["61"]["mountpoint"] == str(inst.mountpoint)
    mgr.release_unused(set())


def test_backend_sweep(
    make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager, rmini: RecordingMini
) -> None:
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    mgr.ensure_instance(make_image("71"), {})
    assert "sweep" not in rmini.names()
    assert mgr.check_liveness() == []
    assert rmini.names().count("sweep") == 1
    mgr.release_unused(set())


def test_backend_watch_pids(
    make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager, rmini: RecordingMini
) -> None:
    """A helper the backend asks to be watched wakes the liveness monitor when it dies: the
    sweep comes at once, not at the next interval."""
    rmini.helper = subprocess.Popen(["sleep", "600"])
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    try:
        mgr.recover()
        mgr.start_liveness_monitor(interval=600)
        time.sleep(0.5)
        assert "sweep" not in rmini.names()
        t0 = time.monotonic()
        rmini.helper.send_signal(signal.SIGKILL)
        rmini.helper.wait()
        deadline = time.monotonic() + 5
        while "sweep" not in rmini.names() and time.monotonic() < deadline:
            time.sleep(0.01)
        swept = [t for name, t in rmini.calls if name == "sweep"]
        assert swept and swept[0] - t0 < 1.0
    finally:
        mgr.close()
        if rmini.helper.poll() is None:
            rmini.helper.kill()


def test_backend_check_upgrade(
    make_config: MakeConfig,
    make_image: MakeImage,
    bind: BindBackend,
    rmini: RecordingMini,
    events: EventRecorder,
    tmp_path: Path,
) -> None:
    program = tmp_path / "new-daemon"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    pm = build_plugin_manager([events, Plugin(bind, rmini)], entry_points=False, env={})
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), pm)
    mgr.ensure_instance(make_image("81"), {})
    rmini.upgrade_blocker = "the mini backend needs a supervisor for that"
    with pytest.raises(FailedPrecondition, match="needs a supervisor for that"):
        mgr.upgrade(str(program))
    assert "upgrade" not in rmini.names()
    mgr.release_unused(set())
    mgr.close()
    # a backend that does not declare the capability is never asked
    no_upgrade = build_plugin_manager(
        [Plugin(bind, RecordingMini(), hot_upgrade=False)], entry_points=False, env={}
    )
    mgr2 = DaemonManager(make_config("dedicated", fs_driver="mini"), no_upgrade)
    with pytest.raises(FailedPrecondition, match="backend mini cannot hot-upgrade"):
        mgr2.upgrade(str(program))


def test_backend_upgrade(
    make_config: MakeConfig,
    make_image: MakeImage,
    cpm: NydusPluginManager,
    rmini: RecordingMini,
    events: EventRecorder,
    tmp_path: Path,
) -> None:
    program = tmp_path / "new-daemon"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    mgr = DaemonManager(make_config("shared", fs_driver="mini"), cpm)
    a, b = mgr.ensure_instance(make_image("91"), {}), mgr.ensure_instance(make_image("92"), {})
    (done,) = mgr.upgrade(str(program), version="v9")
    assert ("upgrade", (a.daemon_id, ["91", "92"], str(program), "v9")) in rmini.calls
    assert done["program"] == str(program) and done["version"] == "v9" and done["old_version"] == "mini-0.1.0"
    saved = mgr.store.get_daemon(a.daemon_id)
    assert saved is not None and saved.program == str(program)  # persisted
    assert events.names(a.daemon_id)[-1] == "upgraded" and b.daemon_id == a.daemon_id
    with pytest.raises(Exception, match="not an absolute path"):
        mgr.upgrade("relative/program")
    daemon = mgr.daemon(a.daemon_id)
    assert daemon is not None
    kill9(daemon.pid)
    assert not pid_alive(daemon.pid)


def test_backend_concurrent_prepare_of_two_backends(
    root: Path, make_config: MakeConfig, make_image: MakeImage, cpm: NydusPluginManager
) -> None:
    """Images of two backends are served side by side; each release goes to its own backend."""
    mgr = DaemonManager(make_config("dedicated", fs_driver="mini"), cpm)
    img = make_image("101")
    other = make_image("102", {"b.txt": "B"})
    results: list[Instance] = []
    threads = [
        threading.Thread(target=lambda: results.append(mgr.ensure_instance(img, {}))),
        threading.Thread(
            target=lambda: results.append(
                mgr.ensure_instance(
                    ImageSource(
                        format="t", meta_id="102", bootstrap=other.bootstrap, image_ref="x", backend="bindfs"
                    ),
                    {},
                )
            )
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(i.fs_driver for i in results) == ["bindfs", "mini"]
    assert (root / "snapshots" / "102" / "mnt" / "b.txt").read_text() == "B"
    mgr.release_unused(set())
    assert mgr.daemons() == [] and mgr.instances() == []
    assert not os.path.ismount(root / "snapshots" / "102" / "mnt")
