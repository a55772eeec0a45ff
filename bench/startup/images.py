"""The benchmark's images, built offline and pushed to the local registry in OCI and nydus form.

``busybox`` is the tests' three-layer busybox image; ``python``, ``python-big`` and ``gcc`` are
Debian bookworm minbase roots with packages (`nydus_core.testing.debian_image`, cached per
package set under /var/cache/nydus-core-tests). Every image is converted with our ``nydusify``.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import attrs

from nydus_core.testing.debian_image import ImageBuildError, _run, build_debian_py_image
from nydus_core.testing.services import build_busybox_image

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


@attrs.frozen
class BuiltImage:
    """One image in both formats; `refs` maps a format ("oci", "nydus") to a reference."""

    name: str
    refs: dict[str, str]
    sizes: dict[str, int]  # format -> sum of the manifest's layer sizes (what a full pull downloads)


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


def build_image(name: str, workdir: Path, registry_host: str) -> BuiltImage:
    """Build `name` (one of `ALL_IMAGES`), push it and its nydus conversion to `registry_host`."""
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
    return BuiltImage(name, refs, {fmt: _size(registry_host, ref) for fmt, ref in refs.items()})
