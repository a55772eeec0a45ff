"""``make bench``: build the images, run the startup grid, write JSON lines, a table and charts.

Usage (as root)::

    python bench/startup/run.py                      # quick grid, 3 samples, busybox + python
    python bench/startup/run.py --grid full -n 5 --images busybox,python,python-big,gcc
    python bench/startup/run.py --images python --workloads python-import,python-http \\
        --snapshotter overlayfs --snapshotter stargz-go --snapshotter stargz-go-opt --snapshotter nydus
    python bench/startup/run.py --snapshotter overlayfs --snapshotter nydus \\
        --snapshotter name=stargz,socket=/run/stargz/stargz.sock,format=estargz
    python bench/startup/run.py --snapshotter-config my.toml   # [[snapshotter]] name/socket/format/pull

Modes (``--snapshotter``): overlayfs, nydus, nydus-opt (ours on the image ``nydusify optimize``
made for the sample's workload, prefetching its table), nydus-before (nydus without the issue-16
start-up levers), stargz-go, stargz-go-opt (the Go stargz-snapshotter on the unoptimized /
workload-optimized eStargz image), nydus-estargz, nydus-estargz-opt (ours on the same eStargz
images). Without ``--snapshotter``: overlayfs, nydus, and the stargz-go modes when
containerd-stargz-grpc is there. Samples of one network condition run in shuffled order (the
bandwidth limit is set once per condition); each sample starts from a clean state (see
`startup.harness`). A sample that fails is reported and recorded with its error, the run goes on,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nydus_core.testing.debian_image import ImageBuildError
from nydus_core.testing.estargz import EstargzError
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Registry, ServiceError
from startup.harness import (
    BUILTIN_SNAPSHOTTERS,
    WORKLOADS,
    BenchError,
    SnapshotterSpec,
    default_snapshotters,
    nydusd_template,
    parse_snapshotter,
    proxy_rtt,
    run_sample,
    trace_needed,
    via_proxy,
)
from startup.images import ALL_IMAGES, BuiltImage, build_image
from startup.report import charts, failure_lines, markdown_table, summarize
from startup.shaping import FULL_GRID, QUICK_GRID, SLOW_LINK, UNSHAPED, bandwidth_limit

DEFAULT_WORKLOADS = {
    "busybox": ["busybox-cat"],
    "python": ["python-import", "python-http", "python-tar-usr"],
    "python-big": ["python-big-import"],
    "gcc": ["gcc-hello"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--grid", choices=("quick", "full", "unshaped", "slow", "quick+slow"), default="quick",
                   help="networks: quick = unshaped + 100 Mbit/s 20 ms; slow = 3 MB/s 100 ms; "
                        "full = all four")
    p.add_argument("-n", "--samples", type=int, default=3, help="samples per cell (default 3)")
    p.add_argument("--images", default="busybox,python", help=f"comma list of {','.join(ALL_IMAGES)}")
    p.add_argument("--workloads", default="", help=f"comma list (default: all of the images'); "
                   f"known: {','.join(WORKLOADS)}")
    p.add_argument("--snapshotter", action="append", default=[],
                   help=f"{' | '.join(BUILTIN_SNAPSHOTTERS)} | "
                   "name=<n>,socket=<path>,format=<fmt>[,pull=rpull|ctr] (repeat; default: overlayfs, nydus "
                   "and, when containerd-stargz-grpc is built, stargz-go and stargz-go-opt)")
    p.add_argument("--snapshotter-config", type=Path,
                   help="TOML with [[snapshotter]] name, socket, format, pull")
    p.add_argument("--amplify-io", type=int, default=1 << 20,
                   help="nydusd read amplification for timed samples (upstream default 1 MiB)")
    p.add_argument("--no-trace", action="store_true", help="skip the physical-limit trace")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    return args


def snapshotters(args: argparse.Namespace) -> list[SnapshotterSpec]:
    specs = [parse_snapshotter(s) for s in args.snapshotter]
    if args.snapshotter_config is not None:
        doc = tomllib.loads(args.snapshotter_config.read_text())
        for entry in doc.get("snapshotter", []):
            text = ",".join(f"{k}={v}" for k, v in entry.items())
            specs.append(parse_snapshotter(text))
    if specs:
        return specs
    specs, note = default_snapshotters()
    if note:
        print(note, file=sys.stderr, flush=True)
    return specs


def workloads(args: argparse.Namespace, images: list[str]) -> list[str]:
    if args.workloads:
        names = [w for w in args.workloads.split(",") if w]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown:
            raise BenchError(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
        return names
    return [w for img in images for w in DEFAULT_WORKLOADS.get(img, [])]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return f"{os.cpu_count()} x {cpu}, {mem} MiB RAM, Linux {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/startup needs root (containerd, mounts, tc, drop_caches)", file=sys.stderr)
        return 2
    images = [i for i in args.images.split(",") if i]
    wls = workloads(args, images)
    images = list(dict.fromkeys([*images, *(WORKLOADS[w].image for w in wls)]))
    specs = snapshotters(args)
    grid = {"quick": QUICK_GRID, "full": FULL_GRID, "unshaped": (UNSHAPED,), "slow": (SLOW_LINK,),
            "quick+slow": (*QUICK_GRID, SLOW_LINK)}[args.grid]
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    jsonl = args.out / f"startup-{stamp}.jsonl"
    work = Path(tempfile.mkdtemp(prefix="nydus-bench-reg-"))
    registry = Registry(work / "registry")
    registry.start()
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    traces: dict[str, dict[str, float]] = {}
    # eStargz images only when a mode pulls them; the optimized ones only when a mode pulls those.
    estargz_wls = None
    if any(s.fmt.startswith("estargz") for s in specs):
        estargz_wls = [WORKLOADS[w] for w in wls] if any(s.fmt == "estargz-opt" for s in specs) else []
    optimize_wls = [WORKLOADS[w] for w in wls] if any(s.fmt == "nydus-opt" for s in specs) else []
    try:
        with FaultyProxy(registry.url, max_concurrency=64) as proxy:
            built: dict[str, BuiltImage] = {}
            for name in images:
                print(f"bench: building {name} ...", file=sys.stderr, flush=True)
                built[name] = build_image(name, work / "images", registry.host, estargz_wls, optimize_wls)
                print(f"bench: {name}: {built[name].sizes}", file=sys.stderr, flush=True)
            template = nydusd_template(args.amplify_io)
            # The limit's trace reads with our nydus mode (amplification off) whatever lazy modes run.
            lazy = BUILTIN_SNAPSHOTTERS["nydus"] if any(s.fmt != "oci" for s in specs) else None
            if not args.no_trace and lazy is not None:
                for w in wls:
                    img = built[WORKLOADS[w].image]
                    traces[w] = trace_needed(lazy, via_proxy(img.refs[lazy.fmt], proxy),
                                             via_proxy(img.refs["oci"], proxy), WORKLOADS[w], proxy, template)
                    print(f"bench: trace {w}: {traces[w]}", file=sys.stderr, flush=True)
            with jsonl.open("w") as out:
                for net in grid:
                    jobs = [(s, w, i) for s in specs for w in wls for i in range(args.samples)
                            if built[WORKLOADS[w].image].ref_for(s.fmt, w) is not None]
                    rng.shuffle(jobs)
                    with bandwidth_limit(proxy.port, net.mbit), proxy_rtt(proxy, net.rtt_ms):
                        for spec, w, i in jobs:
                            wl = WORKLOADS[w]
                            img = built[wl.image]
                            ref = img.ref_for(spec.fmt, w)
                            assert ref is not None
                            meta = dict(network=net.name, mbit=net.mbit, rtt_ms=net.rtt_ms, workload=w,
                                        image=wl.image, mode=spec.mode, fmt=spec.fmt, sample=i,
                                        image_bytes=img.size_for(spec.fmt, w))
                            try:
                                rec = run_sample(spec, via_proxy(ref, proxy), wl, proxy, template)
                            except (BenchError, ServiceError, EstargzError, ImageBuildError,
                                    subprocess.TimeoutExpired) as e:
                                fail = {**meta, "error": str(e)[-3000:]}
                                failures.append(fail)
                                out.write(json.dumps(fail) + "\n")
                                out.flush()
                                first = next((ln for ln in str(e).splitlines() if ln.strip()), "?")
                                print(f"bench: {net.name} {w} {spec.mode} #{i}: FAILED: {first[:300]}",
                                      file=sys.stderr, flush=True)
                                continue
                            rec.update(meta)
                            records.append(rec)
                            out.write(json.dumps(rec) + "\n")
                            out.flush()
                            print(f"bench: {net.name} {w} {spec.mode} #{i}: e2e {rec['e2e_s']:.2f}s "
                                  f"(pull {rec['pull_s']:.2f} create {rec['create_s']:.2f} run "
                                  f"{rec['run_s']:.2f}) {rec['bytes'] / 1e6:.1f} MB",
                                  file=sys.stderr, flush=True)
    finally:
        registry.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(records, traces)
    table = markdown_table(rows) + failure_lines(failures)
    header = (f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {machine()}; "
              f"{args.samples} sample(s) per cell, grid {args.grid}, "
              f"nydusd-py amplify_io {args.amplify_io}.\n\n")
    (args.out / "summary.md").write_text(header + table)
    (args.out / "summary.json").write_text(
        json.dumps({"rows": rows, "traces": traces, "failures": failures}, indent=1) + "\n")
    print(header + table)
    if not args.no_charts:
        try:
            for path in charts(rows, args.out):
                print(f"chart: {path}")
        except ImportError as e:  # the table is written; the charts need the bench extra
            print(f"bench: no charts ({e}): pip install -e '.[bench]' (make bench does)", file=sys.stderr)
    print(f"records: {jsonl}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
