"""eStargz images made by Debian's ``ctr-remote`` run lazily through containerd 1.6.

The image (Debian + python3 + an edge-case layer) is converted with ``ctr-remote image convert
--estargz --oci``, pulled with ``ctr-remote image rpull --snapshotter nydus`` through a counting
proxy, and run with ``ctr run``. What the container sees must equal what the same image shows when
containerd's overlayfs snapshotter unpacks it, and the layers must have been read only by range.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess

import pytest
from conftest import EstargzImage
from stargz_stack import StargzStack

from nydus_core.data.remote.reference import parse_ref
from nydus_core.testing.proxy import FaultyProxy
from nydus_core.testing.services import Containerd

pytestmark = [pytest.mark.containerd, pytest.mark.root]

LISTING = (
    "find / -xdev | LC_ALL=C sort; "
    "find / -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; "
    "stat -c '%n %f %u %g %h %t:%T %s %Y' /opt/edge/*; getfattr -d /opt/edge/hello.txt 2>/dev/null; "
    "cat /opt/edge/hello-link; python3 -c 'import json, sqlite3; print(\"ready\")'"
)


def via(ref: str, proxy: FaultyProxy) -> str:
    r = parse_ref(ref)
    return f"{proxy.host}/{r.repo}:{r.tag}"


def rpull(containerd: Containerd, ref: str, snapshotter: str = "nydus") -> None:
    ctr_remote = shutil.which("ctr-remote")
    assert ctr_remote
    proc = subprocess.run(
        [
            ctr_remote,
            "--address",
            containerd.address,
            "-n",
            containerd.namespace,
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            ref,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def run(containerd: Containerd, ref: str, snapshotter: str, script: str) -> str:
    cid = f"esgz-{secrets.token_hex(4)}"
    out = containerd.ctr(
        "run", "--rm", "--snapshotter", snapshotter, ref, cid, "sh", "-c", script, timeout=300
    )
    return out.stdout


def test_ctr_remote_estargz_image_runs_lazily_and_equals_overlayfs(
    stargz_stack: StargzStack, estargz_image: EstargzImage, counting_proxy: FaultyProxy
) -> None:
    ref = via(estargz_image.esgz_ref, counting_proxy)
    cd = stargz_stack.containerd
    cd.ctr("image", "pull", "--plain-http", ref, timeout=600)  # overlayfs: downloads and unpacks
    expected = run(cd, ref, "overlayfs", LISTING)
    cd.ctr("image", "rm", ref, timeout=60)

    counting_proxy.reset_requests()
    rpull(cd, ref)
    got = run(cd, ref, "nydus", LISTING)
    assert got.splitlines() == expected.splitlines()
    assert got.rstrip().endswith("ready")

    layers = _layer_digests(counting_proxy, estargz_image.esgz_ref)
    gets = [r for r in counting_proxy.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in layers]
    assert gets, "no layer was read at all: the test would prove nothing"
    whole = [(r.path, r.status, r.range) for r in gets if r.status != 206 or not r.range]
    assert not whole, f"layers must be read only by range: {whole[:5]}"
    log = stargz_stack.log()
    assert "TOC of" in log and "converted" in log


def _layer_digests(proxy: FaultyProxy, ref: str) -> set[str]:
    import json
    import urllib.request

    r = parse_ref(ref)
    req = urllib.request.Request(
        f"http://{r.api_host}/v2/{r.repo}/manifests/{r.tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = json.loads(resp.read())
    return {layer["digest"] for layer in doc["layers"]}
