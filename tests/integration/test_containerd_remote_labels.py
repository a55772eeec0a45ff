"""A pull that carries remote-snapshot labels, for an image no remote format can serve.

``ctr-remote image rpull`` (Debian package stargz-snapshotter) sends ``containerd.io/snapshot.ref``
and ``containerd.io/snapshot/remote/stargz.*`` labels with every layer's Prepare, like CRI does
with its ``cri.*`` labels. For plain gzip OCI layers the snapshotter must not claim them as
remote ("already exists"): containerd has to download and unpack every layer, and the image must
run. Checked through the registry's own access log.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from nydus_core.testing.services import (
    BUSYBOX_LAYER3_FILE,
    BUSYBOX_LAYER3_TEXT,
    Containerd,
    NydusSnapshotter,
    Registry,
)

pytestmark = pytest.mark.containerd


def blob_gets(log_text: str) -> int:
    """Count successful blob downloads in a docker-registry log."""
    return sum(
        1
        for line in log_text.splitlines()
        if "/blobs/sha256:" in line and "http.request.method=GET" in line and "response completed" in line
    )


def test_rpull_with_remote_labels_unpacks_plain_layers(
    containerd: Containerd,
    nydus_snapshotter: NydusSnapshotter,
    registry: Registry,
    busybox_image: str,
    ns: str,
) -> None:
    ctr_remote = shutil.which("ctr-remote")
    assert ctr_remote, "ctr-remote missing: apt-get install stargz-snapshotter"
    log_offset = registry.log_path.stat().st_size
    pulled = subprocess.run(
        [
            ctr_remote,
            "--address",
            containerd.address,
            "-n",
            ns,
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "nydus",
            busybox_image,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert pulled.returncode == 0, pulled.stderr

    with registry.log_path.open() as f:
        f.seek(log_offset)
        assert blob_gets(f.read()) >= 4, "config + 3 layers must have been downloaded and unpacked"

    listed = containerd.ctr("snapshots", "--snapshotter", "nydus", "ls", namespace=ns).stdout
    names = [line.split()[0] for line in listed.splitlines()[1:]]
    assert len(names) == 3
    for name in names:
        info = json.loads(
            containerd.ctr("snapshots", "--snapshotter", "nydus", "info", name, namespace=ns).stdout
        )
        assert info["Kind"] == "Committed"
        assert info["Labels"]["containerd.io/snapshot.ref"] == name
        assert "containerd.io/snapshot/remote/stargz.reference" in info["Labels"]

    out = containerd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "nydus",
        busybox_image,
        "rpull-run",
        "/bin/cat",
        BUSYBOX_LAYER3_FILE,
        namespace=ns,
    ).stdout
    assert out == BUSYBOX_LAYER3_TEXT + "\n"
