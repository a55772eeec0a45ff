"""End-to-end fixtures: the Debian+python nydus image, a counting proxy, and a full stack per test.

The stack is real: docker-registry <- `FaultyProxy` (counts every request and the bytes it
served) <- nydusd-py (lazy blob reads) and containerd 1.6 (manifests, the bootstrap layer), with
our ``containerd-nydus-grpc`` as containerd's proxy snapshotter. Image references name the proxy,
so every byte any component takes from the registry is counted.

Each test gets its own containerd, snapshotter and blob cache (a warm cache would hide what a
cold start downloads); the image is built and converted once per session. The measured numbers
are written to ``lazy-pull.json`` in the test's tmp dir and printed in pytest's terminal summary,
so they show without ``-s``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydus_core.testing.container_load import LoadImage, build_load_image
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Registry

sys.path.insert(0, str(Path(__file__).parent))

from e2e_helpers import BUILD, FAILOVER, MEASUREMENTS, E2EStack

from nydus_core.testing.debian_image import DebianImage, build_debian_py_image


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "snapshot_annotations_off: e2e stack with CRI's default "
                            "disable_snapshot_annotations = true")
    config.addinivalue_line("markers", "amplify_io(n): e2e stack whose nydusd template sets amplify_io = n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    tr = terminalreporter
    if FAILOVER:
        tr.section("nydus daemon failover / restart with containers (noisy timings: shared CPUs)")
        for line in FAILOVER:
            tr.write_line(line)
    if not MEASUREMENTS and not BUILD:
        return
    tr.section("nydus lazy pull (bytes the registry served)")
    if BUILD:
        tr.write_line(f"image build: {json.dumps(BUILD)}")
    for m in MEASUREMENTS:
        tr.write_line(
            f"{m['test']} [{m['daemon_mode']}]: data blobs {m['data_bytes_served']:,} B "
            f"in {m['data_requests']} ranged GETs, bootstrap {m['bootstrap_bytes_served']:,} B; "
            f"image: OCI gzip {m['oci_compressed_bytes']:,} B, nydus blobs {m['nydus_data_blob_bytes']:,} B "
            f"-> {m['served_fraction_of_oci']:.1%} of the OCI image"
        )


@pytest.fixture(scope="session")
def debian_py(registry: Registry, nydus_services_dir: Path) -> DebianImage:
    """``debian-py:bookworm`` (OCI) and ``debian-py:nydus`` (converted) in the session registry."""
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap, containerd and FUSE mounts")
    image = build_debian_py_image(nydus_services_dir / "debian-py", registry.host)
    BUILD.update({k: round(v, 1) for k, v in image.build_seconds.items()})
    return image


@pytest.fixture(scope="session")
def load_image(registry: Registry, nydus_services_dir: Path) -> LoadImage:
    """``nydus-load:nydus``: Debian + python3 with a ``/data`` payload of random bytes (the
    failover tests' containers read it through the daemon), and its OCI source ``:bookworm``."""
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap, containerd and FUSE mounts")
    return build_load_image(nydus_services_dir / "load", registry.host)


@pytest.fixture(scope="session")
def counting_proxy(registry: Registry) -> Iterator[FaultyProxy]:
    """A counting reverse proxy in front of the session registry (no faults armed)."""
    with FaultyProxy(registry.url, max_concurrency=64) as proxy:
        yield proxy


@pytest.fixture(params=["dedicated", "shared"])
def daemon_mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture
def e2e_stack(
    daemon_mode: str, counting_proxy: FaultyProxy, request: pytest.FixtureRequest
) -> Iterator[E2EStack]:
    """A fresh stack for one test (own blob cache), in the parametrized daemon mode.

    Mark a test ``snapshot_annotations_off`` to get CRI's default
    ``disable_snapshot_annotations = true``."""
    marker = request.node.get_closest_marker("snapshot_annotations_off")
    amplify = request.node.get_closest_marker("amplify_io")
    workdir = Path(tempfile.mkdtemp(prefix="nydus-e2e-"))  # short: unix socket paths
    stack = E2EStack(workdir, daemon_mode, plain_http=(counting_proxy.host,),
                     snapshot_annotations=marker is None,
                     amplify_io=int(amplify.args[0]) if amplify is not None else None)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure attach the snapshotter, containerd and daemon logs of the test's stack."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("e2e_stack")
    if report.failed and isinstance(stack, E2EStack):
        report.sections.append(("nydus snapshotter log", stack.snapshotter.log_tail(8000)))
        report.sections.append(("containerd log", _tail(stack.containerd.log_path, 4000)))
        for log in sorted((stack.snapshotter.root / "logs").glob("*/*.log")):
            report.sections.append((f"daemon log {log.parent.name}", _tail(log, 4000)))
    return report


def _tail(path: Path, limit: int) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
