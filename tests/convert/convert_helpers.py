"""Helpers for the nydusify tests: a layered image with whiteouts built with umoci, registry reads,
and running the `nydusify` console script."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nydus_core.data.remote.reference import parse_ref
from nydus_core.data.remote.registry import OCI_MANIFEST, RegistryClient

NYDUSIFY = str(Path(sys.executable).with_name("nydusify"))
BIG_SIZE = 3 * (1 << 20) + 12345  # several 1 MiB chunks and a partial one


def run_nydusify(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NYDUSIFY, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})  # fmt: skip


def client_for(ref: str) -> RegistryClient:
    r = parse_ref(ref)
    return RegistryClient(r.api_host, r.repo, plain_http=True)


def get_manifest(ref: str) -> tuple[dict[str, Any], dict[str, Any], RegistryClient]:
    """(manifest, config, client) of an image by tag."""
    client = client_for(ref)
    m = client.get_manifest(parse_ref(ref).tag, accept=(OCI_MANIFEST,))
    manifest = json.loads(m.data)
    config = json.loads(client.read_blob(manifest["config"]["digest"]))
    return manifest, config, client


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
         **extra: Any) -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = extra.pop("mtime", 1_700_000_000)
    for k, v in extra.items():
        setattr(info, k, v)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def big_content() -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB, repeated: chunks dedup inside the blob
    return (block * 4)[: BIG_SIZE - 1000] + os.urandom(1000)


def _layer1(path: Path, big: bytes) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "a/file1", data=b"one\n")
        _add(tf, "a/sub", tarfile.DIRTYPE, mode=0o750)
        _add(tf, "a/sub/x", data=b"x\n", uid=1000, gid=1000)
        _add(tf, "b", tarfile.DIRTYPE)
        _add(tf, "b/keep", data=b"old\n")
        _add(tf, "del", tarfile.DIRTYPE)
        _add(tf, "del/me", data=b"gone\n")
        _add(tf, "opq", tarfile.DIRTYPE)
        _add(tf, "opq/old1", data=b"old1\n")
        _add(tf, "opq/olddir", tarfile.DIRTYPE)
        _add(tf, "opq/olddir/f", data=b"f\n")
        _add(tf, "link", tarfile.SYMTYPE, linkname="a/file1", mode=0o777)
        _add(tf, "hard1", data=b"hardlinked\n")
        _add(tf, "hard2", tarfile.LNKTYPE, linkname="hard1")
        _add(tf, "fifo", tarfile.FIFOTYPE)
        _add(tf, "null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tf, "xattr", data=b"with xattr\n", pax_headers={"SCHILY.xattr.user.foo": "bar"})
        _add(tf, "d" * 120, data=b"long name\n")
        _add(tf, "big", data=big, pax_headers={"mtime": "1700000000.123456789"})


def _layer2(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "a/.wh.file1", data=b"")
        _add(tf, ".wh.del", data=b"")
        _add(tf, "opq", tarfile.DIRTYPE, mode=0o700)
        _add(tf, "opq/.wh..wh..opq", data=b"")
        _add(tf, "opq/new", data=b"new\n")
        _add(tf, "b", tarfile.DIRTYPE)
        _add(tf, "b/keep", data=b"new content\n", mode=0o600, uid=1000, gid=100)


def _layer3(path: Path) -> None:
    """Metadata only (a directory and a whiteout): the converter writes no blob for it."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "newdir", tarfile.DIRTYPE, mode=0o711)
        _add(tf, ".wh.link", data=b"")


#: What the merged image must show (and must not), independent of the code under test.
WHITEOUT_PRESENT = ["a", "a/sub", "a/sub/x", "b", "b/keep", "opq", "opq/new", "hard1", "hard2", "fifo",
                    "null", "xattr", "d" * 120, "big", "newdir"]  # fmt: skip
WHITEOUT_ABSENT = ["a/file1", "del", "del/me", "opq/old1", "opq/olddir", "link"]


def build_whiteout_image(workdir: Path, registry_host: str, repo: str = "whiteouts") -> tuple[str, bytes]:
    """Three layers (files of every type, then whiteouts and an opaque dir, then metadata only) added
    with ``umoci raw add-layer`` and pushed with skopeo. Returns (reference, content of /big)."""
    umoci, skopeo = shutil.which("umoci"), shutil.which("skopeo")
    assert umoci and skopeo, "umoci and skopeo are required"
    workdir.mkdir(parents=True, exist_ok=True)
    layout = workdir / "oci"
    image = f"{layout}:{repo}"

    def run(*argv: str) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stdout}{proc.stderr}"

    big = big_content()
    run(umoci, "init", "--layout", str(layout))
    run(umoci, "new", "--image", image)
    for i, make in enumerate((lambda p: _layer1(p, big), _layer2, _layer3), 1):
        tar = workdir / f"layer{i}.tar"
        make(tar)
        run(umoci, "raw", "add-layer", "--image", image, str(tar))
    run(
        umoci,
        "config",
        "--image",
        image,
        "--config.cmd",
        "/bin/sh",
        "--architecture",
        "amd64",
        "--os",
        "linux",
    )
    ref = f"{registry_host}/{repo}:latest"
    run(skopeo, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image}", f"docker://{ref}")
    return ref, big


def assert_ok(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def push_variant(ref: str, target_tag: str, manifest: dict[str, Any], config: dict[str, Any] | None = None,
                 blobs: Sequence[bytes] = ()) -> str:  # fmt: skip
    """Push `manifest` (and a new `config`, extra `blobs`) to the repository of `ref` as `target_tag`."""
    client = client_for(ref)
    try:
        for b in blobs:
            client.push_blob(b)
        if config is not None:
            raw = json.dumps(config).encode()
            digest, _ = client.push_blob(raw)
            manifest = {**manifest, "config": {**manifest["config"], "digest": digest, "size": len(raw)}}
        client.push_manifest(target_tag, json.dumps(manifest).encode(), OCI_MANIFEST)
    finally:
        client.close()
    r = parse_ref(ref)
    return f"{r.host}/{r.repo}:{target_tag}"
