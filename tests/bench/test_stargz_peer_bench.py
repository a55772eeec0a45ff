"""The startup benchmark measures the Go stargz-snapshotter peer: one stargz-go sample, python image.

Runs bench/startup/run.py as a subprocess with ``--snapshotter stargz-go`` on the python image
(unshaped, ``python3 -c 'import json, sqlite3'``, one sample): the image is converted to eStargz
with ctr-remote (cached under /var/cache/nydus-core-tests/estargz), a fresh
``containerd-stargz-grpc`` serves it to a fresh containerd, and the sample must be ready with
its layer data fetched by byte range. Skipped, with the reason printed, when the peer binary is
not built (``PEER_BIN=/var/cache/nydus-core-tests/peer-bin bash
bench/peers/stargz-grpc/build.sh``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.containerd, pytest.mark.root]

BENCH = Path(__file__).resolve().parents[2] / "bench"
RUN = BENCH / "startup" / "run.py"


def _peer_missing() -> str | None:
    """Why the peer mode cannot run here (None: it can)."""
    sys.path.insert(0, str(BENCH))
    try:
        from startup.harness import PEER_BUILD_HINT, peer_binary
    finally:
        sys.path.remove(str(BENCH))
    if peer_binary() is None:
        return f"containerd-stargz-grpc not found: {PEER_BUILD_HINT}"
    if shutil.which("ctr-remote") is None:
        return "ctr-remote not found: apt-get install stargz-snapshotter"
    return None


@pytest.fixture(scope="module")
def peer_record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if os.geteuid() != 0:
        pytest.skip("needs root: containerd, FUSE and overlay mounts, drop_caches")
    reason = _peer_missing()
    if reason is not None:
        print(f"skipping the stargz peer bench: {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("stargz-peer-bench")
    argv = [sys.executable, str(RUN), "--grid", "unshaped", "-n", "1", "--images", "python",
            "--workloads", "python-import", "--snapshotter", "stargz-go", "--no-trace", "--no-charts",
            "--out", str(out)]
    # First run on a machine: debootstrap (about 35 s) and the eStargz conversion (about 50 s).
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    (jsonl,) = out.glob("startup-*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 1, records
    record: dict[str, object] = records[0]
    return record


def test_peer_sample_is_ready_with_ranged_fetches(peer_record: dict[str, object]) -> None:
    r = peer_record
    assert r["mode"] == "stargz-go" and r["fmt"] == "estargz", r
    assert r["workload"] == "python-import" and r["network"] == "unshaped", r
    assert "error" not in r, r
    pull, create, run, e2e = (float(str(r[k])) for k in ("pull_s", "create_s", "run_s", "e2e_s"))
    assert min(pull, create, run) > 0 and abs(e2e - (pull + create + run)) < 0.01, r
    assert "ready" in str(r["output"]), r
    # Lazy: the layer is read by byte range (TOC, then the chunks python opens), not downloaded whole.
    assert int(str(r["ranged_bytes"])) > 0 and int(str(r["ranged_requests"])) > 0, r
    assert int(str(r["bytes"])) < int(str(r["image_bytes"])), r
    cpu = r["cpu_s"]
    assert isinstance(cpu, dict) and float(cpu["stargz-grpc"]) > 0, r
