"""Issue 5's hot upgrade with real containers: a new daemon program takes over, no container sees
an error.

containerd 1.6 + our ``containerd-nydus-grpc`` (``recover_policy = "failover"``) + nydusd-py, the
nydus load image (`nydus_core.testing.container_load`) pulled with ``ctr-remote image rpull``: one
container reads an 8 MiB file in a loop (held open, page cache dropped every pass, sha256
checked), another lists directories and reads small files. Meanwhile ``PUT
/api/v1/daemons/upgrade`` moves the daemon onto another program: a wrapper generated here that
runs nydusd-py but reports another ``package_ver``. ``GET /api/v1/daemon`` on the daemon's API
socket gives the version before and after; both containers must finish without an error or a
wrong byte, and complete passes served by the new program. The longest operation each container
saw is printed, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import FAILOVER, E2EStack

from nydus_core.control.daemons.client import NydusdClient
from nydus_core.testing.container_load import ContainerLoad, LoadImage, wait_for_passes
from nydus_core.testing.services import Registry, process_alive

pytestmark = [pytest.mark.containerd, pytest.mark.root]

NEW_VERSION = "0.1.0+e2e-upgrade"


@contextlib.contextmanager
def _stack(registry: Registry, mode: str) -> Iterator[E2EStack]:
    workdir = Path(tempfile.mkdtemp(prefix="nydus-up-"))  # short: unix socket paths
    stack = E2EStack(workdir, mode, plain_http=(registry.host,), recover_policy="failover")
    try:
        stack.start()
        yield stack
    except BaseException:
        print("---- snapshotter log ----\n" + stack.snapshotter.log_tail(20000))
        raise
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _serving(stack: E2EStack, ref: str) -> dict[str, Any]:
    (d,) = [d for d in stack.daemons() if any(i["image_id"] == ref for i in d["instances"].values())]
    return d


def _package_ver(api_socket: str) -> str:
    with NydusdClient(Path(api_socket), timeout=5) as c:
        return str(c.daemon_info().version.get("package_ver", ""))


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_hot_upgrade_under_running_containers(mode: str, registry: Registry, load_image: LoadImage,
                                              tmp_path: Path) -> None:  # fmt: skip
    program = tmp_path / "nydusd-next"
    program.write_text(
        f"#!{sys.executable}\nimport sys\nimport nydus_core.data.runtime\n"
        f"nydus_core.data.runtime.__version__ = {NEW_VERSION!r}\n"
        "from nydus_fuse.daemon.main import main\nsys.exit(main())\n"
    )
    program.chmod(0o755)
    with _stack(registry, mode) as stack:
        ref = load_image.nydus_ref
        ctr_remote = shutil.which("ctr-remote")
        assert ctr_remote, "ctr-remote missing: apt-get install stargz-snapshotter"
        ctrd = stack.containerd
        subprocess.run([ctr_remote, "--address", ctrd.address, "-n", ctrd.namespace, "image", "rpull",
                        "--plain-http", "--snapshotter", "nydus", ref],
                       check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
        out = tmp_path / "out"
        big = ContainerLoad(stack.containerd, ref, load_image, out, "big", "big")
        tree = ContainerLoad(stack.containerd, ref, load_image, out, "tree", "tree")
        with big, tree:
            loads = [big, tree]
            wait_for_passes(loads, {"big": 2, "tree": 2}, 60)
            before = _serving(stack, ref)
            old_ver = _package_ver(before["api_socket"])
            t = time.monotonic()
            body = {"nydusd_path": str(program)}
            status, answer = stack.snapshotter.system_put("/api/v1/daemons/upgrade", body)
            took = (time.monotonic() - t) * 1000
            assert status == 200, answer
            after = _serving(stack, ref)
            new_ver = _package_ver(after["api_socket"])
            # both containers complete two more passes, served by the new program
            wait_for_passes(loads, {x.name: x.passes() + 2 for x in loads}, 120)
            results = [big.stop(), tree.stop()]
        assert after["id"] == before["id"] and after["mountpoint"] == before["mountpoint"]
        assert after["pid"] != before["pid"] and not process_alive(before["pid"])
        assert after["pid"] == _serving(stack, ref)["pid"]
    for r in results:
        assert r.exit_code == 0, f"container {r.name} exited {r.exit_code}: {r.stderr}"
        assert r.errors == 0, f"container {r.name} saw errors: {r.errors_seen}"
        assert r.bad_passes == 0, f"container {r.name} read wrong bytes in {r.bad_passes} pass(es)"
    assert old_ver == "nydusd-py 0.1.0" and new_ver == f"nydusd-py {NEW_VERSION}", (old_ver, new_ver)
    (entry,) = answer["upgraded"]
    assert entry["program"] == str(program) and entry["pid"] == after["pid"]
    line = {"mode": mode, "versions": [old_ver, new_ver], "pids": [before["pid"], after["pid"]],
            "put_ms": round(took), "longest_op_ms": {r.name: round(r.max_op_ms, 1) for r in results},
            "passes": {r.name: r.passes for r in results}}  # fmt: skip
    print(f"\n[hot upgrade e2e] {json.dumps(line)}")
    FAILOVER.append(f"[hot upgrade e2e] {json.dumps(line)}")
