"""`nydusify convert`: an OCI image in a registry -> a RAFS v6 (nydus) image in a registry.

Per source layer: download it (digest-verified), build its layer tree and write one native nydus
blob plus a layer bootstrap that keeps the layer's whiteouts. The layer bootstraps are then merged
bottom-up with overlay semantics into the image bootstrap, which is packed as ``image/image.boot``
in a gzip tar: the last layer of the new manifest. A layer without file data (only directories,
links, whiteouts) gets no blob, like upstream; its metadata lives in the bootstrap.

Blob ids are the sha256 of the blob files, which is also the digest they are pushed under, so the
bootstrap's blob table names exactly the registry blobs nydusd will fetch.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from nydus_core.data.rafs.bootstrap import Bootstrap
from nydus_core.data.rafs.writer import BuildOptions, build, merge_bootstraps
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.tools.convert.constants import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    ANNOTATION_NYDUS_REFERENCE_BLOB_IDS,
    ANNOTATION_UNCOMPRESSED,
    BOOTSTRAP_DIR_IN_LAYER,
    BOOTSTRAP_HISTORY,
    BOOTSTRAP_NAME_IN_LAYER,
    NYDUS_BLOB_MEDIA_TYPE,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    SOURCE_LAYER_TYPES,
)
from nydus_core.tools.convert.image import (
    ConvertError,
    RemoteImage,
    Transport,
    diff_ids_of,
    download_blob,
    fetch_image,
    layer_tree,
    open_client,
    parse_reference,
)
from nydus_core.tools.convert.progress import Progress, human

log = logging.getLogger("nydusify")


@dataclass
class ConvertOptions:
    """The `nydusify convert` knobs that change the output or how registries are reached."""

    compressor: str = "zstd"
    chunk_size: int = 1 << 20
    digester: str = "blake3"
    fs_version: str = "6"
    platform: str = "linux/amd64"
    work_dir: str | None = None  # kept (not deleted) when given, like upstream's --work-dir
    source: Transport = field(default_factory=Transport)
    target: Transport = field(default_factory=Transport)
    progress_bar: bool | None = None  # None: only when stdout is a terminal
    #: Absolute paths (files or directories) to prefetch at mount: the bootstrap's prefetch table,
    #: and their data first in each blob (``--prefetch-patterns``; `nydusify optimize` records them).
    prefetch: list[str] = field(default_factory=list)


@dataclass
class LayerResult:
    """What one source layer became: a blob (or none when the layer has no file data)."""

    source_digest: str
    blob_id: str | None
    blob_path: str | None
    blob_size: int
    bootstrap: bytes


@dataclass
class ConvertResult:
    target: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    blob_ids: list[str]


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _bootstrap_layer(bootstrap: bytes) -> tuple[bytes, str]:
    """The bootstrap as a gzip tar holding ``image/`` and ``image/image.boot``; returns the compressed
    bytes and the sha256 digest of the uncompressed tar (its diff id). Times and owners are fixed so
    the same bootstrap always gives the same layer digest."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo(BOOTSTRAP_DIR_IN_LAYER)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        f = tarfile.TarInfo(BOOTSTRAP_NAME_IN_LAYER)
        f.size, f.mode, f.mtime = len(bootstrap), 0o444, 0
        tf.addfile(f, io.BytesIO(bootstrap))
    tar = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    return gzip.compress(tar, mtime=0), diff_id


def _layer_media_type_ok(desc: dict[str, Any], name: str) -> None:
    mt = desc.get("mediaType", "")
    if mt == NYDUS_BLOB_MEDIA_TYPE or ANNOTATION_NYDUS_BOOTSTRAP in (desc.get("annotations") or {}):
        raise ConvertError(f"source image {name} is already a nydus image")
    if mt not in SOURCE_LAYER_TYPES:
        raise ConvertError(
            f"source image {name}: layer {desc.get('digest')} has unsupported media type {mt!r}"
        )


def _convert_layer(src: RemoteImage, index: int, desc: dict[str, Any], diff_id: str | None, work: str,
                   opts: ConvertOptions) -> LayerResult:  # fmt: skip
    total = len(src.layers)
    digest = str(desc["digest"])
    layer_path = os.path.join(work, "layers", digest.replace(":", "-"))
    pull = Progress(f"[{index + 1}/{total}] pull {_short(digest)}", int(desc.get("size", 0)),
                    bar=opts.progress_bar)  # fmt: skip
    download_blob(src.client, desc, layer_path, pull)
    pull.finish()
    build_progress = Progress(f"[{index + 1}/{total}] build {_short(digest)}", 0, bar=opts.progress_bar)
    tree, tar_path = layer_tree(layer_path, diff_id, f"source layer {digest}")
    os.unlink(layer_path)
    tmp_blob = os.path.join(work, "blobs", f".layer-{index}.tmp")
    with open(tmp_blob, "wb") as f:
        result = build(tree, f, BuildOptions(chunk_size=opts.chunk_size, compressor=opts.compressor,
                                             digester=opts.digester, whiteout_spec="oci",
                                             prefetch=opts.prefetch, prefetch_skip_missing=True))  # fmt: skip
    del tree
    os.unlink(tar_path)
    if result.blob is None:
        os.unlink(tmp_blob)
        build_progress.finish("no file data: no blob")
        return LayerResult(digest, None, None, 0, result.bootstrap)
    blob_path = os.path.join(work, "blobs", result.blob.blob_id)
    os.replace(tmp_blob, blob_path)
    size = os.path.getsize(blob_path)
    build_progress.update(size)
    build_progress.finish(f"blob {_short(result.blob.blob_id)}")
    return LayerResult(digest, result.blob.blob_id, blob_path, size, result.bootstrap)


class _CountingReader:
    """A read-only file wrapper that reports bytes read to a progress bar (for uploads)."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f = f
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress.update(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset == 0:
            self._progress.done_bytes = 0  # a retried upload starts over
        return self._f.seek(offset, whence)


def _push_file(client: RegistryClient, path: str, digest: str, label: str, bar: bool | None) -> None:
    size = os.path.getsize(path)
    progress = Progress(label, size, bar=bar)
    with open(path, "rb") as f:
        _, uploaded = client.push_blob(cast(BinaryIO, _CountingReader(f, progress)), digest=digest)
    progress.finish("uploaded" if uploaded else "already in the registry")


def _new_config(source: dict[str, Any], layers: list[LayerResult], diff_ids: list[str]) -> dict[str, Any]:
    """Source config with `rootfs.diff_ids` replaced and the history kept in step with the layers.

    A history entry that is not ``empty_layer`` belongs to the layer at the same position; the entry
    of a source layer that produced no blob becomes ``empty_layer``. A bootstrap entry is appended.
    If the source history does not match its layers, per-layer entries are written instead.
    """
    config = copy.deepcopy(source)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    history = config.get("history")
    real = (
        [h for h in history if isinstance(h, dict) and not h.get("empty_layer")]
        if isinstance(history, list)
        else []
    )
    if isinstance(history, list) and len(real) == len(layers):
        new_history = []
        it = iter(layers)
        for h in history:
            entry = dict(h)
            if not entry.get("empty_layer") and next(it).blob_id is None:
                entry["empty_layer"] = True
            new_history.append(entry)
    else:
        new_history = [{"created_by": "nydusify", "comment": f"Nydus Data Layer from {layer.source_digest}"}
                       if layer.blob_id else
                       {"created_by": "nydusify", "comment": f"no file data in {layer.source_digest}",
                        "empty_layer": True}
                       for layer in layers]  # fmt: skip
    new_history.append(dict(BOOTSTRAP_HISTORY))
    config["history"] = new_history
    return config


def convert(source: str, target: str, opts: ConvertOptions | None = None) -> ConvertResult:
    """Convert image `source` and push it as `target` (a tag). See the module docstring."""
    opts = opts or ConvertOptions()
    if opts.fs_version != "6":
        raise ConvertError(f"fs-version {opts.fs_version} is not supported (only 6)")
    BuildOptions(chunk_size=opts.chunk_size, compressor=opts.compressor, digester=opts.digester).validate()
    src_ref = parse_reference(source, "source")
    dst_ref = parse_reference(target, "target")
    if dst_ref.digest:
        raise ConvertError(f"target {target} must name a tag, not a digest")
    own_work = opts.work_dir is None
    work = tempfile.mkdtemp(prefix="nydusify-") if own_work else str(opts.work_dir)
    os.makedirs(os.path.join(work, "layers"), exist_ok=True)
    os.makedirs(os.path.join(work, "blobs"), exist_ok=True)
    src_client = open_client(src_ref, opts.source)
    dst_client: RegistryClient | None = None
    try:
        src = fetch_image(src_client, src_ref, opts.platform, "source")
        for desc in src.layers:
            _layer_media_type_ok(desc, source)
        if not src.layers:
            raise ConvertError(f"source image {source} has no layers")
        dst_client = open_client(dst_ref, opts.target)
        log.info("converting %s (%d layers, manifest %s) to %s", source, len(src.layers),
                 src.manifest_digest, target)  # fmt: skip
        diff_ids_in = diff_ids_of(src.config, len(src.layers))
        layers = [_convert_layer(src, i, d, diff_ids_in[i], work, opts) for i, d in enumerate(src.layers)]

        merged = merge_bootstraps([Bootstrap(layer.bootstrap) for layer in layers], whiteout_spec="oci",
                                  prefetch=opts.prefetch, prefetch_skip_missing=True)  # fmt: skip
        if opts.prefetch:
            found = len(Bootstrap(merged.bootstrap).prefetch)
            log.info("prefetch table: %d of %d listed paths are in the image", found, len(opts.prefetch))
        blob_ids = [b.blob_id for b in merged.blobs]
        pushed = [layer.blob_id for layer in layers if layer.blob_id]
        # The blob table lists the blobs the merged tree still uses, in first-use order; a layer
        # whose files are all shadowed by upper layers keeps its data layer but is not referenced.
        if not set(blob_ids) <= set(pushed):
            raise ConvertError(
                f"internal error: merged bootstrap names blobs {blob_ids}, layers made {pushed}"
            )
        with open(os.path.join(work, "image.boot"), "wb") as f:
            f.write(merged.bootstrap)
        boot_layer, boot_diff_id = _bootstrap_layer(merged.bootstrap)
        boot_digest = "sha256:" + hashlib.sha256(boot_layer).hexdigest()

        descs: list[dict[str, Any]] = []
        diff_ids: list[str] = []
        for layer in layers:
            if layer.blob_id is None or layer.blob_path is None:
                continue
            digest = "sha256:" + layer.blob_id
            _push_file(dst_client, layer.blob_path, digest, f"push blob {_short(digest)}", opts.progress_bar)
            descs.append(
                {
                    "mediaType": NYDUS_BLOB_MEDIA_TYPE,
                    "digest": digest,
                    "size": layer.blob_size,
                    "annotations": {ANNOTATION_NYDUS_BLOB: "true", ANNOTATION_UNCOMPRESSED: digest},
                }
            )
            diff_ids.append(digest)
        push = Progress(f"push bootstrap {_short(boot_digest)}", len(boot_layer), bar=opts.progress_bar)
        dst_client.push_blob(boot_layer, digest=boot_digest)
        push.update(len(boot_layer))
        push.finish(f"{human(len(merged.bootstrap))} bootstrap")
        descs.append({
            "mediaType": OCI_LAYER_GZIP, "digest": boot_digest, "size": len(boot_layer),
            "annotations": {
                ANNOTATION_UNCOMPRESSED: boot_diff_id,
                ANNOTATION_NYDUS_BOOTSTRAP: "true",
                ANNOTATION_NYDUS_FS_VERSION: opts.fs_version,
                ANNOTATION_NYDUS_REFERENCE_BLOB_IDS: json.dumps(blob_ids, separators=(",", ":")),
            },
        })  # fmt: skip
        diff_ids.append(boot_diff_id)

        config = _new_config(src.config, layers, diff_ids)
        config_raw = json.dumps(config, separators=(",", ":")).encode()
        config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
        dst_client.push_blob(config_raw, digest=config_digest)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
            "layers": descs,
        }
        body = json.dumps(manifest, indent=2).encode()
        manifest_digest = dst_client.push_manifest(dst_ref.tag, body, OCI_MANIFEST)
        log.info(
            "pushed %s (manifest %s): %d blob(s) + bootstrap layer", target, manifest_digest, len(blob_ids)
        )
        return ConvertResult(target, manifest_digest, manifest, config, blob_ids)
    finally:
        src_client.close()
        if dst_client is not None:
            dst_client.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
