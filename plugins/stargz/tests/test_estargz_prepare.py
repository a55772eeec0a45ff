"""Layer Prepare with the estargz format on, against a real docker-registry.

The snapshotter runs in process with the installed plugins (entry points), the blobs are written
by `estargz_writer` and pushed to the session registry. An eStargz layer is claimed (containerd
would skip its download) with its bootstrap written into the snapshot; a plain gzip layer is
left to containerd; a damaged layer is refused at Prepare with InvalidArgument naming the
problem, and nothing is left behind anywhere under the root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
from estargz_writer import Item, footer, write_estargz

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.testing.services import PLAIN_HTTP_NYDUSD_TEMPLATE, Registry

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
REPO = "esgz-unit"


@pytest.fixture
def stargz_on(nydus_config: SnapshotterConfig) -> SnapshotterConfig:
    Path(nydus_config.daemon.nydusd_config).write_text(json.dumps(PLAIN_HTTP_NYDUSD_TEMPLATE))
    return attrs.evolve(
        nydus_config, experimental=attrs.evolve(nydus_config.experimental, enable_stargz=True)
    )


def push(registry: Registry, data: bytes) -> str:
    client = RegistryClient(registry.host, REPO, plain_http=True)
    try:
        return client.push_blob(data)[0]
    finally:
        client.close()


def labels_for(registry: Registry, digest: str, toc: bytes | None, chain: str) -> dict[str, str]:
    out = {
        L.TARGET_SNAPSHOT_REF: chain,
        L.CRI_IMAGE_REF: f"{registry.host}/{REPO}:t",
        L.CRI_LAYER_DIGEST: digest,
    }
    if toc is not None:
        out[TOC_DIGEST] = "sha256:" + hashlib.sha256(toc).hexdigest()
    return out


def files_under(root: Path) -> set[str]:
    skip = ("metadata.db", "logs")
    return {
        str(p.relative_to(root)) for p in root.rglob("*") if not str(p.relative_to(root)).startswith(skip)
    }


def test_estargz_layer_is_claimed_with_its_bootstrap(
    snapshotter: Any, stargz_on: SnapshotterConfig, registry: Registry
) -> None:
    blob, toc = write_estargz([Item("etc/", "dir"), Item("etc/motd", data=b"hi\n")])
    digest = push(registry, blob)
    sn = snapshotter(entry_points=True, config=stargz_on)
    with pytest.raises(grpc.RpcError) as exc:
        sn.prepare("extract-1", labels=labels_for(registry, digest, toc, "sha256:c1"))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = sn.stat("sha256:c1")
    assert info.labels[L.STARGZ] == "true"
    (sid,) = os.listdir(stargz_on.root / "snapshots")
    upper = stargz_on.root / "snapshots" / sid / "fs"
    assert sorted(os.listdir(upper)) == sorted([digest[7:], digest[7:] + ".json", "stargz.index.json"])
    assert json.loads((upper / (digest[7:] + ".json")).read_text()) == {"prefetch": [], "markers": False}
    assert (upper / "stargz.index.json").read_bytes() == toc


def test_plain_gzip_layer_is_left_to_containerd(
    snapshotter: Any, stargz_on: SnapshotterConfig, registry: Registry
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("plain")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"plain"))
    digest = push(registry, gzip.compress(buf.getvalue()))
    sn = snapshotter(entry_points=True, config=stargz_on)
    mounts = sn.prepare("extract-1", labels=labels_for(registry, digest, None, "sha256:p1"))
    assert [m.type for m in mounts] == ["bind"]  # containerd unpacks into it, as with overlayfs


def _damaged() -> dict[str, tuple[bytes, bytes | None, str]]:
    blob, toc = write_estargz([Item("a", data=b"a" * 1000)])
    f_off = len(blob) - 51
    toc_off = int(blob[f_off + 16 : f_off + 32], 16)
    bad_json = b"{not json"
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(bad_json)
    member = gzip.compress(info.tobuf() + bad_json + b"\0" * (1024 + 512 - len(bad_json) % 512))
    malformed = blob[:toc_off] + member + footer(toc_off)
    return {
        "toc-digest-mismatch": (blob, toc + b" ", "does not match"),
        "truncated-footer": (blob[:-20], toc, "footer"),
        "malformed-toc": (malformed, bad_json, "not valid JSON"),
        "toc-offset-beyond-blob": (blob[:toc_off] + footer(len(blob) * 4), toc, "beyond the blob"),
    }


@pytest.mark.parametrize("case", sorted(_damaged()))
def test_damaged_layer_is_refused_at_prepare_leaving_nothing(
    case: str, snapshotter: Any, stargz_on: SnapshotterConfig, registry: Registry
) -> None:
    blob, toc, message = _damaged()[case]
    digest = push(registry, blob)
    sn = snapshotter(entry_points=True, config=stargz_on)
    before = files_under(stargz_on.root)
    with pytest.raises(grpc.RpcError) as exc:
        sn.prepare("extract-1", labels=labels_for(registry, digest, toc, "sha256:d1"))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert message in exc.value.details() and digest in exc.value.details()
    # The failed Prepare removed its snapshot (renamed to rm-<id>, deleted by Cleanup, as any Remove).
    left = files_under(stargz_on.root) - before
    assert all(p.startswith("snapshots/rm-") for p in left), left
    sn.cleanup()
    assert files_under(stargz_on.root) == before
    assert sn.list() == []
