#!/usr/bin/env python3
"""`make demo`: a container started through nydus-core by a real containerd, end to end, offline.

Brings up (all under one temp dir, nothing in /etc): a docker-registry on a free loopback port,
containerd 1.6 with ``[proxy_plugins.nydus]``, and ``containerd-nydus-grpc``. Builds a 3-layer
busybox image with umoci, pushes it with skopeo, pulls it with ``--snapshotter nydus``, runs a
container and checks its output (the plain OCI path). Then converts the image with ``nydusify``,
pulls the nydus image with ``ctr-remote image rpull`` (containerd downloads only the bootstrap
layer) and runs it again, its data read lazily by ``nydusd-py`` (the lazy path). Everything is torn
down at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from nydus_core.testing.services import (
    BUSYBOX_LAYER2_FILE,
    BUSYBOX_LAYER2_TEXT,
    BUSYBOX_LAYER3_FILE,
    BUSYBOX_LAYER3_TEXT,
    PLAIN_HTTP_NYDUSD_TEMPLATE,
    ServiceError,
    ServiceStack,
    build_busybox_image,
)


def step(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so the teardown in ServiceStack.__exit__ still runs."""
    raise SystemExit(f"demo interrupted by signal {signum}")


def run_demo(keep: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="nydus-demo-") as tmp:
        template = Path(tmp) / "nydusd-config.json"
        template.write_text(json.dumps(PLAIN_HTTP_NYDUSD_TEMPLATE, indent=1))
        return _run_demo(keep, template)


def _run_demo(keep: bool, template: Path) -> int:
    args = ["--nydusd-config", str(template)]
    with ServiceStack(with_registry=True, keep=keep, snapshotter_args=args) as stack:
        assert stack.registry and stack.containerd and stack.snapshotter
        ctrd, snap = stack.containerd, stack.snapshotter
        step(f"services up under {stack.workdir}")
        step(f"docker-registry on {stack.registry.url}")
        step(f"containerd on {ctrd.address} with this config:\n{ctrd.config_text()}")
        step(f"containerd-nydus-grpc on {snap.address} (root {snap.root}, log {snap.log_path})")
        try:
            ref = build_busybox_image(stack.workdir / "image", stack.registry.host, repo="demo/busybox")
            step(f"built and pushed a 3-layer busybox image: {ref}")
            ctrd.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref)
            listed = ctrd.ctr("snapshots", "--snapshotter", "nydus", "ls").stdout
            step(f"pulled with --snapshotter nydus; containerd's view of the nydus snapshots:\n{listed}")
            script = (f"echo hello from a container on nydus-core; cat {BUSYBOX_LAYER2_FILE} "
                      f"{BUSYBOX_LAYER3_FILE}")
            out = ctrd.ctr("run", "--rm", "--snapshotter", "nydus", ref, "nydus-demo",
                           "/bin/sh", "-c", script).stdout
            expected = ["hello from a container on nydus-core", BUSYBOX_LAYER2_TEXT, BUSYBOX_LAYER3_TEXT]
            if out.splitlines() != expected:
                raise ServiceError(f"unexpected container output {out!r}, wanted {expected!r}")
            step(f"plain OCI path OK: {' | '.join(out.splitlines())}")
            lazy = run_lazy(ctrd.address, ctrd.namespace, ref, script, ctrd.ctr)
            if lazy.splitlines() != expected:
                raise ServiceError(f"unexpected lazy container output {lazy!r}, wanted {expected!r}")
            step("daemons serving images lazily: " + json.dumps(snap.system_get("/api/v1/daemons"), indent=1))
        except Exception:
            step(f"snapshotter log tail:\n{snap.log_tail(4000)}")
            raise
    print(f"demo OK: container ran through the nydus snapshotter: {' | '.join(out.splitlines())}")
    print(f"demo OK: the nydus image ran lazily through nydusd-py: {' | '.join(lazy.splitlines())}")
    return 0


def run_lazy(address: str, namespace: str, ref: str, script: str, ctr: Any) -> str:
    """Convert `ref` to nydus, rpull it (data blobs are never downloaded) and run it; return stdout."""
    bindir = Path(sys.executable).parent
    target = ref.rsplit(":", 1)[0] + ":nydus"
    subprocess.run([str(bindir / "nydusify"), "convert", "--plain-http", "--source", ref, "--target", target],
                   check=True, stdin=subprocess.DEVNULL)  # fmt: skip
    step(f"converted with nydusify: {target}")
    ctr_remote = shutil.which("ctr-remote")
    if not ctr_remote:
        raise ServiceError("ctr-remote missing: apt-get install stargz-snapshotter")
    subprocess.run([ctr_remote, "--address", address, "-n", namespace, "image", "rpull", "--plain-http",
                    "--snapshotter", "nydus", target], check=True, stdin=subprocess.DEVNULL)  # fmt: skip
    step("pulled with ctr-remote image rpull: only the bootstrap layer was downloaded")
    out: str = ctr("run", "--rm", "--snapshotter", "nydus", target, "nydus-demo-lazy", "/bin/sh", "-c",
                   script).stdout  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) after teardown")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo FAILED: must run as root (containerd, runc and overlay mounts need it)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run_demo(args.keep)
    except (ServiceError, OSError) as e:
        print(f"demo FAILED (everything was torn down; --keep keeps the logs): {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
