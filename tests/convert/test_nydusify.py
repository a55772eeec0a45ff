"""`nydusify convert` / `check` against a real docker-registry (and containerd for the pull test).

Images: the session's 3-layer busybox, and an image with whiteouts, an opaque directory, hardlinks,
a device node, xattrs, a long name and a multi-chunk file, built with umoci. What the merged image
must contain is listed in `convert_helpers` independently of the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from convert_helpers import (
    WHITEOUT_ABSENT,
    WHITEOUT_PRESENT,
    assert_ok,
    build_whiteout_image,
    client_for,
    get_manifest,
    push_variant,
    run_nydusify,
)

from nydus_core.data.rafs.bootstrap import BlobSet, Bootstrap
from nydus_core.data.rafs.tree import Kind, link_counts, tree_from_erofs, walk
from nydus_core.testing.services import Containerd, NydusSnapshotter, Registry
from nydus_core.tools.convert.constants import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    ANNOTATION_NYDUS_REFERENCE_BLOB_IDS,
    ANNOTATION_UNCOMPRESSED,
    NYDUS_BLOB_MEDIA_TYPE,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from nydus_core.tools.convert.progress import Progress


def _target(ref: str, tag: str) -> str:
    return ref.rsplit(":", 1)[0] + ":" + tag


@pytest.fixture(scope="module")
def busybox_nydus(busybox_image: str) -> str:
    target = _target(busybox_image, "nydus")
    assert_ok(
        run_nydusify("convert", "--source", busybox_image, "--target", target, "--plain-http"), "convert"
    )
    return target


@pytest.fixture(scope="module")
def whiteout_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    return build_whiteout_image(tmp_path_factory.mktemp("whiteouts"), registry.host)


@pytest.fixture(scope="module")
def whiteout_nydus(whiteout_image: tuple[str, bytes]) -> str:
    source = whiteout_image[0]
    target = _target(source, "nydus-lz4")
    proc = run_nydusify("convert", "--source", source, "--target", target, "--plain-http",
                        "--compressor", "lz4_block", "--chunk-size", "0x100000")  # fmt: skip
    assert_ok(proc, "convert")
    return target


def _bootstrap_of(manifest: dict[str, Any], client: Any) -> tuple[bytes, bytes]:
    """(image.boot, uncompressed tar) of the manifest's bootstrap layer."""
    layer = client.read_blob(manifest["layers"][-1]["digest"])
    tar = gzip.decompress(layer)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = tf.extractfile("image/image.boot")
        assert member is not None
        return member.read(), tar


def test_busybox_manifest_config_and_layers(busybox_image: str, busybox_nydus: str) -> None:
    manifest, config, client = get_manifest(busybox_nydus)
    src_manifest, src_config, src_client = get_manifest(busybox_image)
    try:
        assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        layers = manifest["layers"]
        assert len(layers) == len(src_manifest["layers"]) + 1  # every busybox layer has file data
        for desc in layers:  # every descriptor's digest and size match the pushed bytes
            data = client.read_blob(desc["digest"])
            assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
            assert len(data) == desc["size"]
        for desc in layers[:-1]:
            assert desc["mediaType"] == NYDUS_BLOB_MEDIA_TYPE
            assert desc["annotations"] == {
                ANNOTATION_NYDUS_BLOB: "true",
                ANNOTATION_UNCOMPRESSED: desc["digest"],
            }
        boot_desc = layers[-1]
        assert boot_desc["mediaType"] == OCI_LAYER_GZIP
        ann = boot_desc["annotations"]
        assert ann[ANNOTATION_NYDUS_BOOTSTRAP] == "true"
        assert ann[ANNOTATION_NYDUS_FS_VERSION] == "6"
        boot, tar = _bootstrap_of(manifest, client)
        assert ann[ANNOTATION_UNCOMPRESSED] == "sha256:" + hashlib.sha256(tar).hexdigest()
        bs = Bootstrap(boot)
        blob_ids = [b.blob_id for b in bs.blobs]
        assert sorted(blob_ids) == sorted(d["digest"].removeprefix("sha256:") for d in layers[:-1])
        assert json.loads(ann[ANNOTATION_NYDUS_REFERENCE_BLOB_IDS]) == blob_ids
        assert manifest["config"]["size"] == len(json.dumps(config, separators=(",", ":")).encode())
        assert config["rootfs"]["diff_ids"] == [d["digest"] for d in layers[:-1]] + [
            ann[ANNOTATION_UNCOMPRESSED]
        ]
        real_history = [h for h in config["history"] if not h.get("empty_layer")]
        assert len(real_history) == len(layers)
        assert real_history[-1]["comment"] == "Nydus Bootstrap Layer"
        for key in ("architecture", "os", "config"):
            assert config[key] == src_config[key]
    finally:
        client.close()
        src_client.close()


def test_busybox_check_passes(busybox_image: str, busybox_nydus: str) -> None:
    proc = run_nydusify("check", "--source", busybox_image, "--target", busybox_nydus, "--plain-http")
    assert_ok(proc, "check")
    assert "check passed" in proc.stdout


def _target_tree(ref: str, workdir: Path) -> tuple[Any, BlobSet, dict[str, Any]]:
    manifest, _, client = get_manifest(ref)
    try:
        boot, _ = _bootstrap_of(manifest, client)
        bs = Bootstrap(boot)
        for desc in manifest["layers"][:-1]:
            (workdir / desc["digest"].removeprefix("sha256:")).write_bytes(client.read_blob(desc["digest"]))
    finally:
        client.close()
    blobs = BlobSet.from_dir(bs, str(workdir))
    return tree_from_erofs(bs.erofs, blobs.read_file, markers=False), blobs, manifest


def test_whiteouts_opaque_and_metadata_only_layer(whiteout_image: tuple[str, bytes], whiteout_nydus: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    root, blobs, manifest = _target_tree(whiteout_nydus, tmp_path)
    try:
        nodes = {p.decode(): n for p, n in walk(root)}
        for path in WHITEOUT_PRESENT:
            assert path in nodes, f"{path} missing from the converted image"
        for path in WHITEOUT_ABSENT:
            assert path not in nodes, f"{path} should have been deleted by a whiteout"
        assert sorted(nodes["opq"].entries) == [b"new"]  # opaque: nothing of layer 1 shows through
        keep = nodes["b/keep"]
        assert (keep.mode, keep.uid, keep.gid) == (0o600, 1000, 100)
        assert keep.content is not None and keep.content.open().read() == b"new content\n"
        assert nodes["hard1"] is nodes["hard2"] and link_counts(root)[id(nodes["hard1"])] == 2
        assert nodes["null"].kind is Kind.CHAR and nodes["null"].rdev == (1, 3)
        assert nodes["fifo"].kind is Kind.FIFO
        assert nodes["xattr"].xattrs == {b"user.foo": b"bar"}
        big = nodes["big"]
        assert big.content is not None and big.content.open().read() == whiteout_image[1]
        assert (big.mtime, big.mtime_nsec) == (1_700_000_000, 123456789)
        assert nodes["newdir"].mode == 0o711
    finally:
        blobs.close()
    # layer 3 holds no file data: no blob for it, and its history entry says so
    assert len(manifest["layers"]) == 3
    _, config, client = get_manifest(whiteout_nydus)
    client.close()
    assert [bool(h.get("empty_layer")) for h in config["history"]] == [False, False, True, True, False]


def test_whiteout_check_passes(whiteout_image: tuple[str, bytes], whiteout_nydus: str) -> None:
    proc = run_nydusify("check", "--source", whiteout_image[0], "--target", whiteout_nydus, "--plain-http")
    assert_ok(proc, "check")


def test_check_fails_against_another_source(busybox_image: str, whiteout_nydus: str) -> None:
    proc = run_nydusify("check", "--source", busybox_image, "--target", whiteout_nydus, "--plain-http")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "check FAILED" in proc.stdout
    assert "/bin/busybox: missing in target" in proc.stdout
    assert "/opq/new: only in target" in proc.stdout


def test_check_fails_on_tampered_chunk_digest(whiteout_image: tuple[str, bytes], whiteout_nydus: str) -> None:
    """A bootstrap whose chunk digest for /b/keep no longer matches the blob: the packaging is made
    consistent again (annotations, diff ids), so only the byte verification can catch it."""
    manifest, config, client = get_manifest(whiteout_nydus)
    try:
        boot, _ = _bootstrap_of(manifest, client)
    finally:
        client.close()
    digest = blake3.blake3(b"new content\n").digest()
    assert boot.count(digest) == 1
    bad = bytearray(boot)
    at = bytes(boot).index(digest)
    bad[at] ^= 0xFF
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("image/image.boot")
        info.size = len(bad)
        tf.addfile(info, io.BytesIO(bytes(bad)))
    tar = raw.getvalue()
    layer = gzip.compress(tar)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    boot_desc = {**manifest["layers"][-1], "digest": "sha256:" + hashlib.sha256(layer).hexdigest(),
                 "size": len(layer)}  # fmt: skip
    boot_desc["annotations"] = {**boot_desc["annotations"], ANNOTATION_UNCOMPRESSED: diff_id}
    config = {
        **config,
        "rootfs": {"type": "layers", "diff_ids": [*config["rootfs"]["diff_ids"][:-1], diff_id]},
    }
    new_manifest = {**manifest, "layers": [*manifest["layers"][:-1], boot_desc]}
    tampered = push_variant(whiteout_nydus, "tampered-digest", new_manifest, config, [layer])
    proc = run_nydusify("check", "--source", whiteout_image[0], "--target", tampered, "--plain-http")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(problems) == 1, proc.stdout
    assert problems[0].startswith("  /b/keep: cannot read target bytes"), proc.stdout


def test_check_fails_on_replaced_blob(busybox_image: str, busybox_nydus: str) -> None:
    """A data layer swapped for other bytes: the bootstrap's blob table no longer matches the layers."""
    manifest, _config, client = get_manifest(busybox_nydus)
    try:
        first = manifest["layers"][0]
        data = bytearray(client.read_blob(first["digest"]))
    finally:
        client.close()
    data[100] ^= 0x01
    new_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    layers = [{**first, "digest": new_digest,
               "annotations": {**first["annotations"], ANNOTATION_UNCOMPRESSED: new_digest}},
              *manifest["layers"][1:]]  # fmt: skip
    tampered = push_variant(
        busybox_nydus, "tampered-blob", {**manifest, "layers": layers}, blobs=[bytes(data)]
    )
    proc = run_nydusify("check", "--source", busybox_image, "--target", tampered, "--plain-http")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"references blob {first['digest'].removeprefix('sha256:')}, which is not a layer" in proc.stdout
    assert "config rootfs.diff_ids" in proc.stdout


def _blob_gets(log_text: str) -> list[str]:
    return re.findall(r'"GET /v2/[^ ]*/blobs/(sha256:[0-9a-f]{64}) HTTP/1.1" 200', log_text)


@pytest.mark.containerd
def test_rpull_with_nydus_snapshotter_skips_data_blobs(
    containerd: Containerd, nydus_snapshotter: NydusSnapshotter, registry: Registry, busybox_nydus: str
) -> None:
    """With the nydus snapshotter the data layers are claimed (never downloaded) and containerd
    unpacks only the bootstrap layer: the snapshot holds exactly our ``image/image.boot``."""
    ctr_remote = shutil.which("ctr-remote")
    assert ctr_remote, "ctr-remote missing: apt-get install stargz-snapshotter"
    ns = "nydusify-rpull"
    manifest, _, client = get_manifest(busybox_nydus)
    try:
        boot, _ = _bootstrap_of(manifest, client)
    finally:
        client.close()
    log_offset = registry.log_path.stat().st_size
    try:
        pulled = subprocess.run([ctr_remote, "--address", containerd.address, "-n", ns, "image", "rpull",
                                 "--plain-http", "--snapshotter", "nydus", busybox_nydus],
                                capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                                check=False)  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
        with registry.log_path.open() as f:
            f.seek(log_offset)
            fetched = set(_blob_gets(f.read()))
        data = {d["digest"] for d in manifest["layers"][:-1]}
        assert manifest["layers"][-1]["digest"] in fetched
        assert not data & fetched, "nydus data blobs must not be downloaded at pull time"
        unpacked = [p for p in nydus_snapshotter.snapshots_dir.rglob("image.boot") if p.read_bytes() == boot]
        assert unpacked, "the bootstrap layer was not unpacked into a nydus snapshot"
    finally:
        containerd.ctr("image", "rm", "--sync", busybox_nydus, namespace=ns, check=False)
        containerd.cleanup_namespace(ns)


@pytest.mark.containerd
def test_containerd_pulls_converted_image(containerd: Containerd, busybox_nydus: str) -> None:
    ns = "nydusify-pull"
    try:
        # `ctr image pull` would also unpack with the default overlayfs snapshotter, which has no
        # stream processor for nydus blob layers (upstream behaves the same): fetch and verify only.
        containerd.ctr("content", "fetch", "--plain-http", busybox_nydus, namespace=ns)
        out = containerd.ctr("image", "check", namespace=ns).stdout
        line = next(row for row in out.splitlines() if busybox_nydus in row)
        assert "complete" in line, out
        assert "incomplete" not in line, out
    finally:
        containerd.ctr("image", "rm", "--sync", busybox_nydus, namespace=ns, check=False)
        containerd.cleanup_namespace(ns)


def test_missing_source_is_a_clear_error(registry: Registry) -> None:
    proc = run_nydusify("convert", "--source", f"{registry.host}/nope:latest",
                        "--target", f"{registry.host}/nope:nydus", "--plain-http")  # fmt: skip
    assert proc.returncode == 1
    assert f"source image {registry.host}/nope:latest not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nydus_source_is_refused(busybox_nydus: str) -> None:
    proc = run_nydusify("convert", "--source", busybox_nydus, "--target", _target(busybox_nydus, "again"),
                        "--plain-http")  # fmt: skip
    assert proc.returncode == 1
    assert "is already a nydus image" in proc.stderr


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    d = tmp_path_factory.mktemp("auth-registry")
    line = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], check=True, capture_output=True, text=True)
    (d / "htpasswd").write_text(line.stdout)
    reg = Registry(d, {"auth": {"htpasswd": {"realm": "nydusify-test", "path": str(d / "htpasswd")}}})
    reg.start()
    yield reg
    reg.stop()


def _docker_config(tmp_path: Path, host: str, user: str, password: str) -> dict[str, str]:
    import base64

    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"DOCKER_CONFIG": str(tmp_path)}


def test_credentials_from_docker_config(busybox_image: str, auth_registry: Registry, tmp_path: Path) -> None:
    target = f"{auth_registry.host}/private:nydus"
    args = ("convert", "--source", busybox_image, "--target", target, "--plain-http")
    wrong = run_nydusify(*args, env=_docker_config(tmp_path, auth_registry.host, "alice", "wrong"))
    assert wrong.returncode == 1
    assert "authentication failed" in wrong.stderr and "refused the credentials" in wrong.stderr, wrong.stderr
    assert "wrong" not in wrong.stderr  # the secret never reaches the output
    right = run_nydusify(*args, env=_docker_config(tmp_path, auth_registry.host, "alice", "s3cret"))
    assert_ok(right, "convert with credentials")


def test_progress_bar_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress("pull layer", 1000, stream=tty)
    p.update(500)
    p.finish()
    assert "\r" in tty.getvalue() and "#" in tty.getvalue() and tty.getvalue().endswith("\n")
    plain = io.StringIO()
    Progress("pull layer", 1000, stream=plain).finish()
    assert plain.getvalue() == ""  # not a terminal: a log line instead of a bar


def test_index_picks_the_platform(busybox_image: str) -> None:
    client = client_for(busybox_image)
    try:
        m = client.get_manifest("latest")
    finally:
        client.close()
    assert m.media_type == "application/vnd.oci.image.manifest.v1+json"

    def entry(arch: str) -> dict[str, Any]:
        return {"mediaType": m.media_type, "digest": m.digest, "size": len(m.data),
                "platform": {"os": "linux", "architecture": arch}}  # fmt: skip

    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [entry("arm64"), entry("amd64")]}  # fmt: skip
    client = client_for(busybox_image)
    try:
        client.push_manifest("multi", json.dumps(index).encode(), index["mediaType"])
    finally:
        client.close()
    source, target = _target(busybox_image, "multi"), _target(busybox_image, "multi-nydus")
    missing = run_nydusify("convert", "--source", source, "--target", target, "--plain-http", "--platform",
                           "linux/s390x")  # fmt: skip
    assert missing.returncode == 1
    assert "has no linux/s390x manifest (it has: linux/amd64, linux/arm64)" in missing.stderr
    assert_ok(run_nydusify("convert", "--source", source, "--target", target, "--plain-http"), "convert")
    assert_ok(run_nydusify("check", "--source", source, "--target", target, "--plain-http"), "check")


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry serving https with a self-signed certificate no trust store knows."""
    d = tmp_path_factory.mktemp("tls-registry")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    reg = Registry(d, tls=(d / "cert.pem", d / "key.pem"))
    reg.start()
    yield reg
    reg.stop()


def test_tls_verified_unless_insecure(busybox_image: str, tls_registry: Registry) -> None:
    """TLS is verified by default; `--target-insecure` skips verification, and `--source-insecure`
    lets a plain-http source registry be reached (fallback from https)."""
    target = f"{tls_registry.host}/secure:nydus"
    verified = run_nydusify("convert", "--source", busybox_image, "--target", target, "--source-insecure")
    assert verified.returncode == 1
    assert "TLS verification of" in verified.stderr and "Traceback" not in verified.stderr, verified.stderr
    insecure = run_nydusify("convert", "--source", busybox_image, "--target", target, "--source-insecure",
                            "--target-insecure")  # fmt: skip
    assert_ok(insecure, "convert to an insecure TLS registry")
    assert_ok(run_nydusify("check", "--source", busybox_image, "--target", target, "--source-insecure",
                           "--target-insecure"), "check")  # fmt: skip


def test_zstd_source_layers(registry: Registry) -> None:
    """An image whose layers are ``tar+zstd`` (pushed by hand) converts and checks like gzip ones."""
    import zstandard

    tars = []
    for files in (
        {"etc/a.txt": b"a\n" * 1000, "etc/b.txt": b"b\n"},
        {"etc/.wh.a.txt": b"", "c.bin": b"c" * 70000},
    ):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tf.addfile(info, io.BytesIO(data))
        tars.append(raw.getvalue())
    source = f"{registry.host}/zstd-image:latest"
    client = client_for(source)
    try:
        layers = []
        for tar in tars:
            blob = zstandard.ZstdCompressor().compress(tar)
            digest, _ = client.push_blob(blob)
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": digest,
                           "size": len(blob)})  # fmt: skip
        diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
        config_doc = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config = json.dumps(config_doc).encode()
        config_digest, _ = client.push_blob(config)
        config_desc = {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)}
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc,
                                    "layers": layers}
        client.push_manifest("latest", json.dumps(manifest).encode(), manifest["mediaType"])
    finally:
        client.close()
    target = f"{registry.host}/zstd-image:nydus"
    assert_ok(run_nydusify("convert", "--source", source, "--target", target, "--plain-http"), "convert")
    assert_ok(run_nydusify("check", "--source", source, "--target", target, "--plain-http"), "check")
