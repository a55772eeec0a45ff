#!/usr/bin/env python3
"""`make demo`: a container started through nydus-core by a real containerd, end to end, offline.

Brings up (all under one temp dir, nothing in /etc): a docker-registry on a free loopback port,
containerd 1.6 with ``[proxy_plugins.nydus]``, and ``containerd-nydus-grpc``. Builds a 3-layer
busybox image with umoci, pushes it with skopeo, pulls it with ``--snapshotter nydus``, runs a
container and checks its output, then tears everything down, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType

from nydus_core.testing.services import (
    BUSYBOX_LAYER2_FILE,
    BUSYBOX_LAYER2_TEXT,
    BUSYBOX_LAYER3_FILE,
    BUSYBOX_LAYER3_TEXT,
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
    with ServiceStack(with_registry=True, keep=keep) as stack:
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
        except Exception:
            step(f"snapshotter log tail:\n{snap.log_tail(4000)}")
            raise
    print(f"demo OK: container ran through the nydus snapshotter: {' | '.join(out.splitlines())}")
    return 0


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
