"""End-to-end fixtures for eStargz: a multi-layer Debian+python3 image converted by Debian's
``ctr-remote``, a counting proxy in front of the registry, and a stack per test (containerd 1.6 +
our snapshotter with ``--enable-stargz`` + nydusd-py over FUSE)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from stargz_stack import StargzStack

from nydus_core.testing.debian_image import build_debian_py_image
from nydus_core.testing.estargz import convert_estargz
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Containerd, Registry

BIG_FILE_SIZE = 9 * 1024 * 1024 + 123  # split into three 4 MiB chunks by ctr-remote


@attrs.frozen
class EstargzImage:
    oci_ref: str
    esgz_ref: str


def _edge_layer(path: Path) -> Path:
    """A layer on top of Debian with what a TOC must carry exactly: hardlinks, symlinks, xattrs,
    device nodes, a fifo, a whiteout of a Debian file, an opaque directory, an empty file and a
    file split into several chunks."""
    rnd = os.urandom(BIG_FILE_SIZE)

    def reg(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644, **pax: str) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
        info.pax_headers = dict(pax)
        tf.addfile(info, io.BytesIO(data))

    def node(tf: tarfile.TarFile, name: str, kind: bytes, **kw: object) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mtime = kind, 1_700_000_000
        for k, v in kw.items():
            setattr(info, k, v)
        tf.addfile(info)

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        node(tf, "opt/", tarfile.DIRTYPE, mode=0o755)
        node(tf, "opt/edge/", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
        reg(tf, "opt/edge/big.bin", rnd, 0o600)
        reg(
            tf,
            "opt/edge/hello.txt",
            b"hello from an eStargz layer\n",
            0o644,
            **{"SCHILY.xattr.user.origin": "estargz-test"},
        )
        node(tf, "opt/edge/hello-link", tarfile.LNKTYPE, linkname="opt/edge/hello.txt", mode=0o644)
        node(tf, "opt/edge/sym", tarfile.SYMTYPE, linkname="hello.txt", mode=0o777)
        reg(tf, "opt/edge/empty", b"", 0o640)
        node(tf, "opt/edge/null2", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        node(tf, "opt/edge/fifo", tarfile.FIFOTYPE, mode=0o644)
        reg(tf, "etc/.wh.issue", b"")  # whiteout of Debian's /etc/issue
        node(tf, "usr/share/doc/", tarfile.DIRTYPE, mode=0o755)
        reg(tf, "usr/share/doc/.wh..wh..opq", b"")  # opaque: Debian's docs are hidden
        reg(tf, "usr/share/doc/README", b"only this file is left in /usr/share/doc\n")
    return path


@pytest.fixture(scope="session")
def estargz_image(registry: Registry, nydus_services_dir: Path) -> EstargzImage:
    """``stargz-src:bookworm`` (OCI, Debian + python3 + the edge layer) and ``:esgz`` (ctr-remote
    ``image convert --estargz --oci``), both in the session registry."""
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap, containerd and FUSE mounts")
    if shutil.which("ctr-remote") is None:
        pytest.skip("ctr-remote missing: apt-get install stargz-snapshotter")
    work = nydus_services_dir / "stargz"
    work.mkdir(parents=True, exist_ok=True)
    edge = _edge_layer(work / "edge.tar")
    built = build_debian_py_image(work / "image", registry.host, repo="stargz-src", extra_layers=[edge])
    esgz = built.oci_ref.rsplit(":", 1)[0] + ":esgz"
    cd = Containerd(Path(tempfile.mkdtemp(prefix="esgz-cvt-")), {})
    cd.start()
    try:
        convert_estargz(cd, cd.namespace, built.oci_ref, esgz)
    finally:
        cd.stop()
        shutil.rmtree(cd.workdir, ignore_errors=True)
    return EstargzImage(built.oci_ref, esgz)


@pytest.fixture(scope="session")
def counting_proxy(registry: Registry) -> Iterator[FaultyProxy]:
    with FaultyProxy(registry.url, max_concurrency=64) as proxy:
        yield proxy


@pytest.fixture
def stargz_stack(counting_proxy: FaultyProxy) -> Iterator[StargzStack]:
    workdir = Path(tempfile.mkdtemp(prefix="esgz-e2e-"))
    stack = StargzStack(workdir, plain_http=(counting_proxy.host,))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report: Any = yield
    stack = getattr(item, "funcargs", {}).get("stargz_stack")
    if report.failed and isinstance(stack, StargzStack):
        report.sections.append(("nydus snapshotter log", stack.log_tail(8000)))
    return report
