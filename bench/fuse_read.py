"""Read throughput of a fully cached file through nydusd-py's FUSE mount versus local disk.

One run builds an image holding a random file, starts `nydusd-py` (dedicated, localfs backend),
reads the file once through the mount so every chunk is in the blob cache, and then measures,
alternately and with the page cache dropped before every pass (``echo 3 >
/proc/sys/vm/drop_caches``, root only):

* sequential: the whole file with 1 MiB ``readinto`` calls, MiB/s;
* random: 4 KiB ``pread`` at random 4 KiB-aligned offsets, reads/s;

for the local copy of the file and for the same file through the mount. It prints a table with
medians and FUSE/local ratios. ``--profile`` also records the daemon with py-spy during one
FUSE pass of each kind and prints its hottest functions.

    python bench/fuse_read.py [--size-mib 256] [--runs 3] [--random-reads 20000] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from nydus_core.control.daemons.client import NydusdClient
from nydus_core.data.rafs.tree import tree_from_dir
from nydus_core.data.rafs.writer import BuildOptions, build_to_paths

MIB = 1 << 20


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def seq_read(path: Path) -> float:
    """MiB/s of one sequential pass with a 1 MiB buffer."""
    buf = bytearray(MIB)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / MIB / (time.perf_counter() - start)


def rand_read(path: Path, offsets: list[int]) -> float:
    """4 KiB preads per second at the given offsets."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return len(offsets) / (time.perf_counter() - start)
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nydusd_py() -> str:
    local = Path(sys.executable).parent / "nydusd-py"
    found = str(local) if local.exists() else shutil.which("nydusd-py")
    if not found:
        sys.exit("nydusd-py not found: pip install -e plugins/fuse")
    return found


def profile(pid: int, seconds: float, out: Path, work: Callable[[], object]) -> list[tuple[str, int]]:
    """Sample `pid` with py-spy while `work` runs; the most frequent leaf functions."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not installed; skipping the profile", file=sys.stderr)
        return []
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1),
                             "--format", "raw", "--output", str(out), "--rate", "500", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    work()
    proc.wait(timeout=seconds + 30)
    leaves: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        for frame in reversed(frames):  # innermost Python frame of our code or pyfuse3/trio
            if "(" in frame:
                leaves[frame.split(" (")[0] + " (" + frame.rsplit("/", 1)[-1]] += int(count)
                break
    return leaves.most_common(12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--profile", action="store_true", help="sample the daemon with py-spy")
    ap.add_argument("--dir", help="work directory (default: a new temp dir on the root fs)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (FUSE mount, drop_caches)")
    work = Path(tempfile.mkdtemp(prefix="fuse-bench-", dir=args.dir or "/var/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    mnt = work / "mnt"
    try:
        src = work / "src"
        src.mkdir()
        local = src / "data.bin"
        with open(local, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        blobs = work / "blobs"
        blobs.mkdir()
        t0 = time.perf_counter()
        build_to_paths(tree_from_dir(str(src)), str(work / "image.boot"), None, str(blobs),
                       BuildOptions(compressor="none"))  # fmt: skip
        print(f"image built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        config = work / "config.json"
        config.write_text(json.dumps({
            "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(work / "cache")}}},
        }))  # fmt: skip
        sock = work / "api.sock"
        proc = subprocess.Popen([nydusd_py(), "fuse", "--config", str(config), "--bootstrap",
                                 str(work / "image.boot"), "--mountpoint", str(mnt), "--apisock", str(sock),
                                 "--log-level", "warn", "--log-file", str(work / "nydusd.log")])  # fmt: skip
        with NydusdClient(sock) as c:
            if not c.wait_state("RUNNING", timeout=30):
                sys.exit("nydusd-py did not start; see " + str(work / "nydusd.log"))
            fused = mnt / "data.bin"
            t0 = time.perf_counter()
            with open(fused, "rb") as f:
                while f.read(4 * MIB):
                    pass
            print(f"first (cold, fetching) pass: {args.size_mib / (time.perf_counter() - t0):.0f} MiB/s",
                  file=sys.stderr)  # fmt: skip
            assert c.blobcache_metrics()["data_all_ready"], "file not fully cached"
        rng = random.Random(42)
        blocks = args.size_mib * MIB // 4096
        offsets = [rng.randrange(blocks) * 4096 for _ in range(args.random_reads)]
        dropped = drop_caches()
        results: dict[tuple[str, str], list[float]] = {}
        daemon_cpu = {"seq": 0.0, "rand": 0.0}
        assert proc is not None
        for _ in range(args.runs):
            for name, path in (("local", local), ("fuse", fused)):
                drop_caches()
                cpu0 = cpu_seconds(proc.pid)
                results.setdefault(("seq 1 MiB (MiB/s)", name), []).append(seq_read(path))
                cpu1 = cpu_seconds(proc.pid)
                drop_caches()
                results.setdefault(("rand 4 KiB (reads/s)", name), []).append(rand_read(path, offsets))
                if name == "fuse":
                    daemon_cpu["seq"] += cpu1 - cpu0
                    daemon_cpu["rand"] += cpu_seconds(proc.pid) - cpu1
        print(f"\nfile {args.size_mib} MiB, {args.runs} runs, medians"
              f"{'' if dropped else ' (page cache NOT dropped: not root?)'}")  # fmt: skip
        print(f"{'test':<22}{'local':>12}{'nydusd-py':>12}{'ratio':>8}")
        for test in ("seq 1 MiB (MiB/s)", "rand 4 KiB (reads/s)"):
            loc = statistics.median(results[(test, "local")])
            fus = statistics.median(results[(test, "fuse")])
            print(f"{test:<22}{loc:>12.0f}{fus:>12.0f}{fus / loc:>8.2f}")
        gib = args.runs * args.size_mib / 1024
        print(f"daemon CPU: {daemon_cpu['seq'] / gib:.2f} s per GiB sequential, "
              f"{daemon_cpu['rand'] / (args.runs * len(offsets)) * 1e6:.0f} us per random 4 KiB read")
        if args.profile:
            assert proc is not None
            for label, fn in (("sequential", lambda: seq_read(fused)),
                              ("random", lambda: rand_read(fused, offsets))):  # fmt: skip
                drop_caches()
                top = profile(proc.pid, 6, work / f"prof-{label}.txt", fn)
                total = sum(n for _, n in top) or 1
                print(f"\nhottest daemon frames, {label} pass (share of the top 12):")
                for frame, n in top:
                    print(f"  {100 * n / total:5.1f}%  {frame}")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(["umount", "-l", str(mnt)], stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
