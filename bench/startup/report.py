"""Percentiles, the physical limit, the markdown table and the charts from the JSON-line records."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Round trips no client can avoid: resolve the manifest; fetch the metadata (config, and the
#: bootstrap for lazy formats, in parallel); fetch the data the workload reads (all ranges at once).
UNAVOIDABLE_ROUND_TRIPS = 3


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def physical_limit(needed_bytes: float, warm_s: float, bytes_per_second: float | None,
                   rtt_ms: float) -> float:
    """Seconds: needed bytes over the bandwidth + unavoidable round trips + the warm local run."""
    transfer = 0.0 if bytes_per_second is None else needed_bytes / bytes_per_second
    return transfer + UNAVOIDABLE_ROUND_TRIPS * rtt_ms / 1000.0 + warm_s


def summarize(records: Iterable[dict[str, Any]], traces: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (network, workload, mode): p50/p95 of the phases, bytes, and the ratio to the limit."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["network"], r["workload"], r["mode"])].append(r)
    rows = []
    for (net, wl, mode), rs in groups.items():
        first = rs[0]
        row: dict[str, Any] = {"network": net, "mbit": first["mbit"], "rtt_ms": first["rtt_ms"],
                               "workload": wl,
                               "image": first["image"], "mode": mode, "n": len(rs),
                               "image_bytes": first["image_bytes"]}
        for phase in ("pull_s", "create_s", "run_s", "e2e_s"):
            row[f"{phase}_p50"] = percentile([r[phase] for r in rs], 50)
            row[f"{phase}_p95"] = percentile([r[phase] for r in rs], 95)
        row["bytes_p50"] = percentile([r["bytes"] for r in rs], 50)
        row["requests_p50"] = percentile([r["requests"] for r in rs], 50)
        for key in sorted({k for r in rs for k in r["cpu_s"]}):
            row[f"cpu_{key}_s_p50"] = percentile([r["cpu_s"].get(key, 0.0) for r in rs], 50)
        # Everything but containerd: our snapshotter + its nydusd-py daemons, or the Go peer.
        row["cpu_snapshotter_side_s_p50"] = percentile(
            [sum(v for k, v in r["cpu_s"].items() if k != "containerd") for r in rs], 50)
        tr = traces.get(wl)
        if tr is not None:
            bps = None if first["mbit"] is None else first["mbit"] * 1e6 / 8
            row["limit_s"] = physical_limit(tr["needed_bytes"], tr["warm_s"], bps, first["rtt_ms"])
            row["x_limit"] = row["e2e_s_p50"] / row["limit_s"]
        rows.append(row)
    net_order = {n: i for i, n in enumerate(dict.fromkeys(r["network"] for r in records))}
    rows.sort(key=lambda r: (net_order.get(r["network"], 99), r["workload"], r["mode"]))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per row: phases p50, e2e p50/p95, registry bytes and requests until ready (p50),
    the share of the image's layer bytes, snapshotter-side CPU (p50, not containerd's) and the limit."""
    head = ("| network | workload | mode | n | pull | create | run | e2e p50 | e2e p95 | fetched MB "
            "| of image | requests | CPU s | limit | x limit |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        frac = r["bytes_p50"] / r["image_bytes"] if r["image_bytes"] else float("nan")
        limit = f"{r['limit_s']:.2f}" if "limit_s" in r else "-"
        xl = f"{r['x_limit']:.2f}" if "x_limit" in r else "-"
        lines.append(
            f"| {r['network']} | {r['workload']} | {r['mode']} | {r['n']} | {r['pull_s_p50']:.2f} "
            f"| {r['create_s_p50']:.2f} | {r['run_s_p50']:.2f} | **{r['e2e_s_p50']:.2f}** "
            f"| {r['e2e_s_p95']:.2f} "
            f"| {r['bytes_p50'] / 1e6:.1f} | {frac:.1%} | {r['requests_p50']:.0f} "
            f"| {r.get('cpu_snapshotter_side_s_p50', 0.0):.2f} | {limit} | {xl} |")
    return "\n".join(lines) + "\n"


def failure_lines(failures: Sequence[dict[str, Any]]) -> str:
    """Markdown lines under the table for the samples that failed, one per (network, workload, mode)
    with the count and the first line of the first error; empty when nothing failed."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for f in failures:
        groups[(f["network"], f["workload"], f["mode"])].append(f)
    if not groups:
        return ""
    lines = ["", "Failed samples (not in the table):", ""]
    for (net, wl, mode), fs in groups.items():
        first = next((ln for ln in str(fs[0]["error"]).splitlines() if ln.strip()), "?")
        lines.append(f"- {net} / {wl} / {mode}: {len(fs)} failed: `{first[:240]}`")
    return "\n".join(lines) + "\n"


def charts(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Stacked pull/create/run bars per workload and mode (one panel per network), and e2e p50
    against bandwidth. Needs matplotlib (the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    nets = list(dict.fromkeys(r["network"] for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    for ax, net in zip(axes[0], nets, strict=True):
        sub = [r for r in rows if r["network"] == net]
        labels = [f"{r['workload']}\n{r['mode']}" for r in sub]
        bottom = [0.0] * len(sub)
        for phase, color in (("pull", "#4c72b0"), ("create", "#dd8452"), ("run", "#55a868")):
            vals = [r[f"{phase}_s_p50"] for r in sub]
            ax.bar(range(len(sub)), vals, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for i, r in enumerate(sub):
            if "limit_s" in r:
                ax.plot([i - 0.4, i + 0.4], [r["limit_s"]] * 2, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(sub)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("seconds (p50)")
        ax.set_title(f"{net} (dashed: physical limit)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "phases.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        mbit = r["mbit"] if r["mbit"] is not None else 1000.0  # unshaped loopback drawn at 1 Gbit/s
        series[(r["workload"], r["mode"])].append((mbit, r["e2e_s_p50"]))
    for (wl, mode), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if mode == "nydus" else "--", label=f"{wl} / {mode}")
    ax.set_xscale("log")
    ax.set_xlabel("bandwidth, Mbit/s (unshaped drawn at 1000)")
    ax.set_ylabel("e2e p50, s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "e2e-vs-bandwidth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
