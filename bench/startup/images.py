"""The benchmark's images, built offline and pushed to the local registry in OCI, nydus and eStargz form.

``busybox`` is the tests' three-layer busybox image; ``python``, ``python-big`` and ``gcc`` are
Debian bookworm minbase roots with packages (`nydus_core.testing.debian_image`, cached per
package set under /var/cache/nydus-core-tests). Every image is converted with our ``nydusify``.

When an eStargz mode runs, each Debian image is also converted with Debian's ``ctr-remote``
(`nydus_core.testing.estargz`, in a containerd of its own): ``:estargz`` (``image convert
--estargz``, unoptimized) and, per workload of that image, ``:estargz-opt-<workload>`` (``image
optimize``: the workload is run once and the files it opens go first, behind the prefetch
landmark, as the stargz project optimizes its images). Conversions are cached under
``/var/cache/nydus-core-tests/estargz`` (keyed by the root filesystem's layer digests and the
command), so only the first run pays for them (about 50-60 s each for python).
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import attrs

from nydus_core.testing.debian_image import ImageBuildError, _run, build_debian_py_image
from nydus_core.testing.estargz import convert_estargz, optimize_estargz
from nydus_core.testing.services import Containerd, build_busybox_image, free_tcp_port
from startup.harness import Workload

NYDUSIFY = str(Path(sys.executable).with_name("nydusify"))

#: Debian packages per image (the python3 set is the e2e image's).
DEBIAN_IMAGES: dict[str, tuple[str, ...]] = {
    "python": ("python3",),
    "python-big": ("python3", "python3-numpy", "python3-pandas", "python3-scipy"),
    "gcc": ("build-essential",),
}
ALL_IMAGES = ("busybox", *DEBIAN_IMAGES)

_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


#: The port the optimizing run of an ``http`` workload listens on (fixed: it is part of the command,
#: so of the cache key; a free port replaces it when it is taken).
OPTIMIZE_HTTP_PORT = 38473
#: How long ``ctr-remote image optimize`` watches a workload that never exits (``--period``).
OPTIMIZE_HTTP_PERIOD_S = 8
#: ... and at most one that exits (it stops at the exit).
OPTIMIZE_EXIT_PERIOD_S = 300


#: Formats made per workload (optimized for it): ``estargz-opt`` (``ctr-remote image optimize``) and
#: ``nydus-opt`` (our ``nydusify optimize``).
PER_WORKLOAD = ("estargz-opt", "nydus-opt")


def ref_key(fmt: str, workload: str) -> str:
    """The `BuiltImage.refs` key of format `fmt` for `workload` (`PER_WORKLOAD` formats are per workload)."""
    return f"{fmt}-{workload}" if fmt in PER_WORKLOAD else fmt


@attrs.frozen
class BuiltImage:
    """One image in several formats; `refs` maps a format ("oci", "nydus", "estargz",
    "estargz-opt-<workload>") to a reference."""

    name: str
    refs: dict[str, str]
    sizes: dict[str, int]  # format -> sum of the manifest's layer sizes (what a full pull downloads)

    def ref_for(self, fmt: str, workload: str) -> str | None:
        """The reference a mode of format `fmt` pulls for `workload` (None: not built)."""
        return self.refs.get(ref_key(fmt, workload))

    def size_for(self, fmt: str, workload: str) -> int:
        return self.sizes[ref_key(fmt, workload)]


def manifest_layers(registry_host: str, ref: str) -> list[dict[str, object]]:
    """The layer descriptors of `ref`'s manifest, read straight from the (unshaped) registry."""
    repo_tag = ref.split("/", 1)[1]
    repo, tag = repo_tag.rsplit(":", 1)
    url = f"http://{registry_host}/v2/{repo}/manifests/{tag}"
    req = urllib.request.Request(url, headers={"Accept": _ACCEPT})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = json.loads(resp.read())
    layers: list[dict[str, object]] = doc["layers"]
    return layers


def _size(registry_host: str, ref: str) -> int:
    return sum(int(str(layer["size"])) for layer in manifest_layers(registry_host, ref))


def build_image(name: str, workdir: Path, registry_host: str,
                estargz_workloads: Sequence[Workload] | None = None,
                optimize_workloads: Sequence[Workload] = ()) -> BuiltImage:
    """Build `name` (one of `ALL_IMAGES`), push it and its nydus conversion to `registry_host`.

    With `estargz_workloads` (Debian images only) also ``:estargz`` and ``:estargz-opt-<w>`` for
    each of those workloads that runs on `name` (see the module docstring); with
    `optimize_workloads`, ``:nydus-opt-<w>`` made by ``nydusify optimize`` for each of those."""
    if name == "busybox":
        oci = build_busybox_image(workdir / name, registry_host, repo="bench-busybox")
        nydus = oci.rsplit(":", 1)[0] + ":nydus"
        _run(NYDUSIFY, "convert", "--plain-http", "--source", oci, "--target", nydus, timeout=600)
    elif name in DEBIAN_IMAGES:
        built = build_debian_py_image(workdir / name, registry_host, repo=f"bench-{name}",
                                      packages=DEBIAN_IMAGES[name])
        oci, nydus = built.oci_ref, built.nydus_ref
    else:
        raise ImageBuildError(f"unknown image {name!r}; known: {', '.join(ALL_IMAGES)}")
    refs = {"oci": oci, "nydus": nydus}
    for wl in optimize_workloads:
        if wl.image == name:
            refs[ref_key("nydus-opt", wl.name)] = optimize_nydus(oci, wl)
    if estargz_workloads is not None and name in DEBIAN_IMAGES:
        refs.update(build_estargz(oci, workdir / name / "estargz",
                                  [w for w in estargz_workloads if w.image == name]))
    return BuiltImage(name, refs, {fmt: _size(registry_host, ref) for fmt, ref in refs.items()})


def optimize_nydus(oci_ref: str, wl: Workload) -> str:
    """``nydusify optimize`` of `oci_ref` for `wl` (the same run bounds as the eStargz optimize:
    a server is recorded until its first response); returns the reference pushed."""
    dst = f"{oci_ref.rsplit(':', 1)[0]}:{ref_key('nydus-opt', wl.name)}"
    flags = ["--period", str(OPTIMIZE_EXIT_PERIOD_S)]
    argv = list(wl.argv)
    if wl.ready == "http":
        port = OPTIMIZE_HTTP_PORT if _port_free(OPTIMIZE_HTTP_PORT) else free_tcp_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
        flags = ["--period", str(OPTIMIZE_HTTP_PERIOD_S), "--net-host",
                 "--probe-url", f"http://127.0.0.1:{port}/"]
    _run(NYDUSIFY, "optimize", "--plain-http", "--source", oci_ref, "--target", dst,
         "--args", json.dumps(argv), *flags, timeout=900)
    print(f"bench: {dst} ready", file=sys.stderr, flush=True)
    return dst


def build_estargz(oci_ref: str, workdir: Path, workloads: Sequence[Workload]) -> dict[str, str]:
    """Push the eStargz forms of `oci_ref` (see the module docstring); format -> reference.

    Runs a containerd of its own (no proxy snapshotter; the optimizing runs use its overlayfs)."""
    repo = oci_ref.rsplit(":", 1)[0]
    containerd = Containerd(workdir / "containerd", {}, namespace=f"estargz-{secrets.token_hex(3)}")
    containerd.start()
    try:
        ns = containerd.namespace
        refs = {"estargz": convert_estargz(containerd, ns, oci_ref, f"{repo}:estargz")}
        for wl in workloads:
            dst = f"{repo}:{ref_key('estargz-opt', wl.name)}"
            if wl.ready == "http":
                port = OPTIMIZE_HTTP_PORT if _port_free(OPTIMIZE_HTTP_PORT) else free_tcp_port()
                argv = [a.replace("{port}", str(port)) for a in wl.argv]
                refs[ref_key("estargz-opt", wl.name)] = optimize_estargz(
                    containerd, ns, oci_ref, dst, argv, None, period=OPTIMIZE_HTTP_PERIOD_S, net_host=True,
                    probe_url=f"http://127.0.0.1:{port}/")
            else:
                refs[ref_key("estargz-opt", wl.name)] = optimize_estargz(
                    containerd, ns, oci_ref, dst, list(wl.argv), None, period=OPTIMIZE_EXIT_PERIOD_S)
            print(f"bench: {dst} ready", file=sys.stderr, flush=True)
    finally:
        containerd.stop()
    return refs


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
