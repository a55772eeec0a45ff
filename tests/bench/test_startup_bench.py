"""The startup benchmark (bench/startup) still works: busybox, one sample, unshaped network.

Runs the real harness end to end as a subprocess (its own registry, counting proxy, a fresh
containerd and snapshotter per sample) and checks what it writes: one JSON line per sample with
phases that add up, registry bytes and requests, the markdown table and (with matplotlib) charts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.containerd, pytest.mark.root]

RUN = Path(__file__).resolve().parents[2] / "bench" / "startup" / "run.py"


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: containerd, mounts, drop_caches")
    out = tmp_path_factory.mktemp("startup-bench")
    argv = [sys.executable, str(RUN), "--grid", "unshaped", "-n", "1", "--images", "busybox",
            "--out", str(out)]
    if importlib.util.find_spec("matplotlib") is None:
        argv.append("--no-charts")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    return out


def _records(out: Path) -> list[dict[str, object]]:
    (jsonl,) = out.glob("startup-*.jsonl")
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def test_one_sample_per_mode_with_sane_phases(bench_out: Path) -> None:
    records = _records(bench_out)
    assert sorted(str(r["mode"]) for r in records) == ["nydus", "oci/overlayfs"]
    for r in records:
        pull, create, run, e2e = (float(str(r[k])) for k in ("pull_s", "create_s", "run_s", "e2e_s"))
        assert min(pull, create, run) > 0, r
        assert e2e >= run and abs(e2e - (pull + create + run)) < 0.01, r
        assert int(str(r["bytes"])) > 0 and int(str(r["requests"])) > 0, r
        assert int(str(r["image_bytes"])) > 0, r
        assert r["workload"] == "busybox-cat" and r["network"] == "unshaped", r
        assert "ready" in str(r["output"]), r
    by_mode = {r["mode"]: r for r in records}
    # A full pull downloads at least the whole image; the lazy pull's data comes by byte range.
    assert int(str(by_mode["oci/overlayfs"]["bytes"])) >= int(str(by_mode["oci/overlayfs"]["image_bytes"]))
    assert int(str(by_mode["nydus"]["ranged_requests"])) > 0


def test_table_and_limit(bench_out: Path) -> None:
    table = (bench_out / "summary.md").read_text()
    assert "| network | workload | mode |" in table
    rows = [line for line in table.splitlines() if line.startswith("| unshaped | busybox-cat |")]
    assert len(rows) == 2, table
    summary = json.loads((bench_out / "summary.json").read_text())
    trace = summary["traces"]["busybox-cat"]
    assert trace["needed_bytes"] > 0 and trace["warm_s"] > 0
    for row in summary["rows"]:
        assert 0 < row["limit_s"] <= row["e2e_s_p50"] * 1.5, row
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("phases.png", "e2e-vs-bandwidth.png"):
            assert (bench_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
