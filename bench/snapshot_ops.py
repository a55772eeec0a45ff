#!/usr/bin/env python3
"""Latency of snapshot operations through containerd: nydus-core versus containerd's overlayfs.

What a user feels is containerd's Snapshots API, not our socket, so every call goes to
containerd (``snapshotter=<name>`` in the request, namespace in the gRPC metadata), which proxies
``nydus`` to us and serves ``overlayfs`` itself. Both are measured in the same run on the same
machine, so the ratio is meaningful even on a noisy shared VM.

Each client (a thread with its own channel) repeats: Prepare(key, parent=top of a committed
chain), Mounts(key), Commit(name, key), Remove(name). Latencies are reported as p50/p99 per op.
Without ``--containerd-address`` it starts its own containerd + containerd-nydus-grpc (no
registry) in a temp dir and stops them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.api.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub

OPS = ("Prepare", "Mounts", "Commit", "Remove")
#: Like ``ctr snapshots``, mark every snapshot a GC root: containerd's collector would otherwise
#: delete unreferenced snapshots (and their chain) between our calls.
GC_ROOT = {"containerd.io/gc.root": "bench-snapshot-ops"}
Metadata = tuple[tuple[str, str], ...]


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); exact for the small sample sizes used here."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Target:
    """One containerd endpoint plus namespace; opens a channel per client thread."""

    def __init__(self, address: str, namespace: str):
        self.address = address
        self.metadata: Metadata = (("containerd-namespace", namespace),)

    def stub(self) -> tuple[grpc.Channel, SnapshotsStub]:
        channel = grpc.insecure_channel(f"unix://{self.address}")
        return channel, SnapshotsStub(channel)


def build_chain(target: Target, snapshotter: str, prefix: str, layers: int) -> list[str]:
    """Commit `layers` stacked snapshots and return their names, bottom first."""
    channel, stub = target.stub()
    names: list[str] = []
    with channel:
        parent = ""
        for i in range(layers):
            key, name = f"{prefix}-layer{i}-active", f"{prefix}-layer{i}"
            stub.Prepare(
                pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=GC_ROOT),
                metadata=target.metadata,
            )
            stub.Commit(
                pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=GC_ROOT),
                metadata=target.metadata,
            )
            names.append(name)
            parent = name
    return names


def remove_chain(target: Target, snapshotter: str, names: list[str]) -> None:
    channel, stub = target.stub()
    with channel:
        for name in reversed(names):
            stub.Remove(pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=name), metadata=target.metadata)


def client_loop(
    target: Target,
    snapshotter: str,
    parent: str,
    prefix: str,
    ops: int,
    results: dict[str, list[float]],
    lock: threading.Lock,
    errors: list[BaseException],
) -> None:
    """One client: `ops` rounds of Prepare/Mounts/Commit/Remove, timing each call."""
    local: dict[str, list[float]] = {op: [] for op in OPS}
    md = target.metadata
    try:
        channel, stub = target.stub()
        with channel:

            def timed(op: str, method: Callable[..., object], request: object) -> None:
                t0 = time.perf_counter()
                method(request, metadata=md)
                local[op].append(time.perf_counter() - t0)

            for j in range(ops):
                key, name = f"{prefix}-{j}", f"{prefix}-{j}-committed"
                timed(
                    "Prepare",
                    stub.Prepare,
                    pb.PrepareSnapshotRequest(
                        snapshotter=snapshotter, key=key, parent=parent, labels=GC_ROOT
                    ),
                )
                timed("Mounts", stub.Mounts, pb.MountsRequest(snapshotter=snapshotter, key=key))
                timed(
                    "Commit",
                    stub.Commit,
                    pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=GC_ROOT),
                )
                timed("Remove", stub.Remove, pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=name))
    except BaseException as e:  # reported by the main thread
        errors.append(e)
    with lock:
        for op, samples in local.items():
            results[op].extend(samples)


def measure(
    target: Target, snapshotter: str, clients: int, ops: int, layers: int, run_id: str
) -> dict[str, list[float]]:
    """Run `clients` threads against one snapshotter; return all latencies (seconds) per op."""
    prefix = f"bench-{run_id}-{snapshotter}-c{clients}"
    chain = build_chain(target, snapshotter, prefix, layers)
    results: dict[str, list[float]] = {op: [] for op in OPS}
    lock = threading.Lock()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(
            target=client_loop,
            args=(target, snapshotter, chain[-1], f"{prefix}-t{i}", ops, results, lock, errors),
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    remove_chain(target, snapshotter, chain)
    if errors:
        raise RuntimeError(f"{snapshotter} with {clients} clients failed: {errors[0]!r}")
    return results


@contextmanager
def own_services(with_snapshotter: bool, log_level: str = "debug") -> Iterator[str]:
    """Start containerd (+ containerd-nydus-grpc) in a temp dir; yield containerd's socket.

    The snapshotter logs at `log_level` (debug by default, as in the test stack; a deployment
    runs at info, where the per-RPC debug lines cost nothing).
    """
    from nydus_core.testing.services import ServiceStack

    with ServiceStack(with_registry=False, with_snapshotter=with_snapshotter,
                      snapshotter_args=["--log-level", log_level]) as stack:
        assert stack.containerd is not None
        yield stack.containerd.address


def report(rows: list[dict[str, object]], snapshotters: list[str], as_json: bool) -> None:
    """Markdown table: p50/p99 per snapshotter, plus nydus/overlayfs ratios when both ran."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    with_ratio = "nydus" in snapshotters and "overlayfs" in snapshotters
    header = ["clients", "op"]
    for name in snapshotters:
        header += [f"{name} p50 ms", f"{name} p99 ms"]
    if with_ratio:
        header += ["ratio p50", "ratio p99"]
    print("| " + " | ".join(header) + " |")
    print("|---:|---|" + "---:|" * (len(header) - 2))
    index = {(str(r["snapshotter"]), int(str(r["clients"])), str(r["op"])): r for r in rows}
    for clients in sorted({int(str(r["clients"])) for r in rows}):
        for op in OPS:
            cells = [str(clients), op]
            stats: dict[str, tuple[float, float]] = {}
            for name in snapshotters:
                r = index[(name, clients, op)]
                stats[name] = (float(str(r["p50_ms"])), float(str(r["p99_ms"])))
                cells += [f"{stats[name][0]:.3f}", f"{stats[name][1]:.3f}"]
            if with_ratio:
                (n50, n99), (o50, o99) = stats["nydus"], stats["overlayfs"]
                cells += [f"{n50 / max(o50, 1e-9):.2f}", f"{n99 / max(o99, 1e-9):.2f}"]
            print("| " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(
        description="p50/p99 of Prepare/Mounts/Commit/Remove via containerd, nydus vs overlayfs"
    )
    ap.add_argument(
        "--containerd-address", help="use this running containerd (it must have [proxy_plugins.nydus])"
    )
    ap.add_argument("--namespace", default=f"bench-ops-{os.getpid()}")
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrency levels (default 1,16)")
    ap.add_argument("-n", "--ops", type=int, default=50, help="rounds per client (default 50)")
    ap.add_argument("--layers", type=int, default=3, help="committed parent chain length (default 3)")
    ap.add_argument("--snapshotters", default="overlayfs,nydus")
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a markdown table")
    ap.add_argument("--snapshotter-log-level", default="debug", choices=["debug", "info", "warn", "error"],
                    help="log level of the snapshotter this script starts (default debug)")
    args = ap.parse_args()
    if args.ops < 1 or args.layers < 1:
        ap.error("--ops and --layers must be at least 1")
    try:
        levels = [int(c) for c in args.clients.split(",") if c]
    except ValueError:
        ap.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    snapshotters = [s for s in args.snapshotters.split(",") if s]

    def run(address: str) -> list[dict[str, object]]:
        target = Target(address, args.namespace)
        run_id = f"{os.getpid()}-{int(time.time())}"
        rows: list[dict[str, object]] = []
        for clients in levels:
            for snapshotter in snapshotters:
                t0 = time.perf_counter()
                samples = measure(target, snapshotter, clients, args.ops, args.layers, run_id)
                wall = time.perf_counter() - t0
                for op in OPS:
                    ms = [s * 1000 for s in samples[op]]
                    rows.append(
                        {
                            "snapshotter": snapshotter,
                            "clients": clients,
                            "op": op,
                            "n": len(ms),
                            "p50_ms": percentile(ms, 50),
                            "p99_ms": percentile(ms, 99),
                            "mean_ms": statistics.fmean(ms),
                            "wall_s": round(wall, 3),
                        }
                    )
        return rows

    if args.containerd_address:
        rows = run(args.containerd_address)
    else:
        if os.geteuid() != 0:
            print(
                "snapshot_ops: starting containerd needs root (or pass --containerd-address)", file=sys.stderr
            )
            return 1
        with own_services("nydus" in snapshotters, args.snapshotter_log_level) as address:
            rows = run(address)
    if not args.json:
        print(
            f"snapshot ops via containerd: {args.ops} rounds per client, parent chain of "
            f"{args.layers}, ratio = nydus / overlayfs (lower is better for nydus)\n"
        )
    report(rows, snapshotters, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
