"""Failover pauses: ``kill -9`` of a FUSE daemon under read load, with and without a warm standby.

The daemon runs as the snapshotter runs it: a `DaemonManager` with ``recover_policy =
"failover"`` and the default fusedev hooks, its liveness monitor (pidfd) noticing the death and
the recover hook taking the live session over -- from a warm standby (``failover_standby =
true``) or from a daemon spawned after the death (``cold``). Readers run in a separate process,
as a container would (a process that holds files on the mount must not be the one that spawns
daemons, see plugins/fuse/tests/failover_reader.py):

* one keeps a big file open and reads it whole in 1 MiB ``pread`` calls, dropping its page cache
  before every pass (so the daemon serves every byte), checking the bytes;
* one lists directories and opens and reads small files.

Every read operation is timed (CLOCK_MONOTONIC, comparable across processes). Per mode it reports
the longest reader operation (the pause a reader saw), the longest operation around each kill
(p50), kill -> RUNNING (the ``recovered`` event of the manager) p50 and max, kill -> death
noticed (its ``died`` event) p50; and the
**baseline** of the same run: the longest reader operation over the same duration without any
kill. Root only (FUSE mounts, drop of the page cache through fadvise).

    python bench/failover.py [-n 20] [--modes standby,cold] [--gap 0.5] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nydus_fuse.backend import standby as standbys

from nydus_core import labels as L
from nydus_core.config import DaemonConfig, SnapshotterConfig
from nydus_core.control.daemons.manager import DaemonManager
from nydus_core.control.daemons.model import DaemonRecord
from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.control.snapshot.model import ImageSource
from nydus_core.data.rafs.tree import tree_from_dir
from nydus_core.data.rafs.writer import BuildOptions, build_to_paths
from nydus_core.hookspecs import hookimpl
from nydus_core.plugins import build_plugin_manager

MIB = 1 << 20
SLOW_OP = 0.001  # reader operations longer than this are reported back individually


# --------------------------------------------------------------------------------------------
# The reader process: ``failover.py --reader MNT SHA256 SECONDS``
# --------------------------------------------------------------------------------------------


def reader(mnt: Path, want: str, seconds: float) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    errors: list[str] = []
    slow: list[tuple[float, float]] = []  # (start, duration) of operations above SLOW_OP
    counts = [0]
    lock = threading.Lock()

    def timed(start: float) -> None:
        took = time.monotonic() - start
        with lock:
            counts[0] += 1
            if took > SLOW_OP:
                slow.append((start, took))

    def big() -> None:
        fd = os.open(mnt / "big", os.O_RDONLY)
        try:
            while time.monotonic() < stop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                h, off = hashlib.sha256(), 0
                while True:
                    t = time.monotonic()
                    data = os.pread(fd, MIB, off)
                    timed(t)
                    if not data:
                        break
                    h.update(data)
                    off += len(data)
                if h.hexdigest() != want:
                    errors.append("big read back wrong bytes")
        finally:
            os.close(fd)

    def tree() -> None:
        names = sorted(f"f{i:03d}" for i in range(100))
        i = 0
        while time.monotonic() < stop:
            t = time.monotonic()
            got = sorted(os.listdir(mnt / "d"))
            timed(t)
            name = f"f{i % 100:03d}"
            t = time.monotonic()
            with open(mnt / "d" / name, "rb") as f:
                data = f.read()
            timed(t)
            if got != names or data != name.encode() * 50:
                errors.append(f"d went wrong: {len(got)} names, {data[:20]!r}")
            i += 1

    def guard(fn: Any) -> None:
        try:
            fn()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=guard, args=(f,)) for f in (big, tree)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"errors": errors[:20], "ops": counts[0], "slow": slow}


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class Events:
    """A plugin recording the manager's daemon events with their time."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, int]] = []

    @hookimpl
    def nydus_daemon_event(self, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        self.seen.append((time.monotonic(), event, int(detail.get("pid", 0))))

    def first_after(self, name: str, t: float, timeout: float = 30.0) -> float:
        """When the first `name` event at or after `t` came (waiting for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, event, _ in list(self.seen):
                if event == name and at >= t:
                    return at
            time.sleep(0.001)
        raise RuntimeError(f"no {name} event within {timeout:g}s")


def nydusd_py() -> str:
    local = Path(sys.executable).parent / "nydusd-py"
    found = str(local) if local.exists() else shutil.which("nydusd-py")
    if not found:
        sys.exit("nydusd-py not found: pip install -e plugins/fuse")
    return found


def build(work: Path, big_mib: int) -> tuple[Path, Path, str]:
    """The image: ``big`` (random bytes) and ``d/f000..f099``; returns bootstrap, blobs, sha256."""
    src = work / "src"
    (src / "d").mkdir(parents=True)
    big = os.urandom(big_mib * MIB + 12345)
    (src / "big").write_bytes(big)
    for i in range(100):
        (src / "d" / f"f{i:03d}").write_bytes(f"f{i:03d}".encode() * 50)
    blobs = work / "blobs"
    blobs.mkdir()
    boot = work / "image.boot"
    build_to_paths(tree_from_dir(str(src)), str(boot), None, str(blobs), BuildOptions(compressor="none"))
    return boot, blobs, hashlib.sha256(big).hexdigest()


def snapshotter_config(root: Path, blobs: Path, standby: bool, mode: str = "dedicated") -> SnapshotterConfig:
    template = root / "nydusd-config.json"
    template.write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": ""}}},
        "mode": "direct", "digest_validate": False, "fs_prefetch": {"enable": False},
    }))  # fmt: skip
    daemon = DaemonConfig(nydusd_path=nydusd_py(), nydusd_config=template, recover_policy="failover")
    # failover_standby is the fuse plugin's key (`nydus_fuse.backend.fusedev.FAILOVER_STANDBY`)
    return SnapshotterConfig(root=root, daemon=daemon, daemon_mode=mode,
                             plugin_options={"daemon.failover_standby": standby})  # fmt: skip


@contextlib.contextmanager
def served_image(
    boot: Path, blobs: Path, standby: bool, daemon_mode: str = "dedicated"
) -> Iterator[tuple[DaemonManager, Events, str, Path]]:
    """A manager serving the image from one daemon (`daemon_mode`); yields it, its events, the
    daemon id and the image's mountpoint."""
    root = Path(tempfile.mkdtemp(prefix="nbf-", dir="/tmp"))  # short: unix socket paths
    events = Events()
    pm = build_plugin_manager([events], env={})  # the installed backends (the fuse plugin)
    mgr = DaemonManager(snapshotter_config(root, blobs, standby, daemon_mode), pm)
    try:
        mgr.recover()
        meta = root / "snapshots" / "1" / "fs" / "image" / "image.boot"
        meta.parent.mkdir(parents=True)
        shutil.copyfile(boot, meta)
        ref = "localhost/bench/failover:latest"
        image = ImageSource(format="nydus", meta_id="1", bootstrap=meta, image_ref=ref,
                            labels={L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: ref})  # fmt: skip
        inst = mgr.ensure_instance(image, {})
        mgr.start_liveness_monitor(interval=5.0)
        yield mgr, events, inst.daemon_id, inst.mountpoint
        mgr.release_unused(set())
    finally:
        mgr.stop_liveness_monitor()  # else it sees the holder go and starts a new one
        for daemon in mgr.daemons():  # a shared daemon outlives its last image (and has a standby)
            mgr.backend(daemon.fs_driver).backend.stop(daemon)
        for registered in pm.registry.backends.values():  # the session holder outlives a snapshotter
            registered.record.backend.purge(root)
        mgr.close()
        umount_tree(root)
        shutil.rmtree(root, ignore_errors=True)


def wait_standby(daemon: DaemonRecord, timeout: float = 60.0) -> None:
    """Until the daemon's standby is warm: INIT with its imports done and its image open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = standbys.recorded(daemon)
        if found is not None and standbys.runs(found.pid, found.api_socket) and standbys.is_warm(found):
            return
        time.sleep(0.005)
    raise RuntimeError(f"no warm standby of daemon {daemon.id} after {timeout:g}s")


def start_reader(mnt: Path, want: str, seconds: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "--reader", str(mnt), want, str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


def reader_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    doc: dict[str, Any] = json.loads(out)
    return doc


def pause_around(slow: list[list[float]], t: float, until: float) -> float:
    """The longest reader operation running at some moment of [t, until]."""
    return max((d for s, d in slow if s <= until and s + d >= t), default=0.0)


def run_mode(
    mode: str,
    boot: Path,
    blobs: Path,
    want: str,
    kills: int,
    gap: float,
    seconds: float = 0.0,
    daemon_mode: str = "dedicated",
) -> dict[str, Any]:
    """`kills` kill -9 (`mode` standby or cold), or none for `seconds` (mode baseline)."""
    standby = mode != "cold"
    with served_image(boot, blobs, standby, daemon_mode) as (mgr, events, did, mnt):
        daemon = mgr.daemon(did)
        assert daemon is not None
        if standby:
            wait_standby(daemon)
        if mode != "baseline":
            seconds = kills * (gap + 0.6) + 1.0  # the reader outlasts the kills
        load = start_reader(mnt, want, seconds)
        t0 = time.monotonic()
        time.sleep(0.5)
        took: list[float] = []
        detect: list[float] = []
        windows: list[tuple[float, float]] = []
        if mode != "baseline":
            for _ in range(kills):
                current = mgr.daemon(did)
                assert current is not None
                if standby:
                    wait_standby(current)
                time.sleep(gap)
                t = time.monotonic()
                os.kill(current.pid, signal.SIGKILL)
                done = events.first_after("recovered", t)
                took.append(done - t)
                detect.append(events.first_after("died", t) - t)
                windows.append((t, done))
        result = reader_result(load)
        elapsed = time.monotonic() - t0
    slow = result["slow"]
    per_kill = [pause_around(slow, a, b) for a, b in windows]
    return {
        "mode": mode,
        "kills": len(took),
        "seconds": elapsed,
        "reader_ops": result["ops"],
        "reader_errors": result["errors"],
        "longest_op_ms": round(max((d for _, d in slow), default=0.0) * 1000, 1),
        "pause_p50_ms": round(statistics.median(per_kill) * 1000, 1) if per_kill else None,
        "kill_to_running_p50_ms": round(statistics.median(took) * 1000, 1) if took else None,
        "kill_to_running_max_ms": round(max(took) * 1000, 1) if took else None,
        "detect_p50_ms": round(statistics.median(detect) * 1000, 1) if detect else None,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        print(json.dumps(reader(Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--kills", type=int, default=20, help="kill -9 per mode (default 20)")
    p.add_argument("--modes", default="standby,cold", help="standby and/or cold (default both)")
    p.add_argument("--gap", type=float, default=0.5, help="seconds of reading before each kill (0.5)")
    p.add_argument("--big-mib", type=int, default=16, help="size of the big file (16 MiB)")
    p.add_argument(
        "--daemon-mode",
        default="dedicated",
        choices=["dedicated", "shared"],
        help="one daemon per image, or images attached to one shared daemon (dedicated)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("root needed (FUSE mounts)")
    work = Path(tempfile.mkdtemp(prefix="nbfi-", dir="/tmp"))
    rows = []
    try:
        boot, blobs, want = build(work, args.big_mib)
        load_before = os.getloadavg()
        for mode in [m for m in args.modes.split(",") if m]:
            if mode not in ("standby", "cold"):
                sys.exit(f"unknown mode {mode!r}")
            rows.append(run_mode(mode, boot, blobs, want, args.kills, args.gap, daemon_mode=args.daemon_mode))
            base = run_mode(
                "baseline",
                boot,
                blobs,
                want,
                0,
                0.0,
                seconds=rows[-1]["seconds"],
                daemon_mode=args.daemon_mode,
            )
            rows.append({**base, "mode": f"baseline ({mode})"})
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"\n{args.daemon_mode} daemon, {args.kills} kill -9 per mode, {args.gap:g}s of reading before "
          f"each, big file {args.big_mib} MiB; {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")  # fmt: skip
    head = ("mode", "kills", "errors", "reader ops", "longest op ms", "pause p50 ms", "kill->RUNNING p50 ms",
            "max ms", "death noticed p50 ms")  # fmt: skip
    keys = ("longest_op_ms", "pause_p50_ms", "kill_to_running_p50_ms", "kill_to_running_max_ms",
            "detect_p50_ms")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["mode"], r["kills"], len(r["reader_errors"]), r["reader_ops"]]
        cells += ["-" if r[k] is None else r[k] for k in keys]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for r in rows:
        if r["reader_errors"]:
            print(f"reader errors in {r['mode']}: {r['reader_errors']}")


if __name__ == "__main__":
    main()
