"""`nydusify check`: prove a converted nydus image holds exactly the source image's filesystem.

Two kinds of evidence are gathered, and every problem found is reported (not just the first):

* the target's packaging: bootstrap layer last with its annotations, data layers with theirs,
  the bootstrap's blob table naming exactly the data layers, `rootfs.diff_ids` and
  `containerd.io/uncompressed` matching the bytes;
* the tree: the source layers merged with overlay semantics against the tree read from the target
  bootstrap, entry by entry (type, mode, owner, size, mtime, link target, xattrs, rdev, hardlink
  count) and file bytes read through the target's blobs, where every chunk's digest is verified.

Every blob is downloaded with its registry digest verified first.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import read_toc, verify_blob_data
from nydus_core.data.rafs.bootstrap import BlobSet, Bootstrap
from nydus_core.data.rafs.tree import (
    Kind,
    Node,
    link_counts,
    merge_layers,
    sorted_walk,
    tree_from_erofs,
)
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.tools.convert.constants import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    ANNOTATION_NYDUS_REFERENCE_BLOB_IDS,
    ANNOTATION_UNCOMPRESSED,
    BOOTSTRAP_NAME_IN_LAYER,
    NYDUS_BLOB_MEDIA_TYPE,
    OCI_LAYER_GZIP,
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
from nydus_core.tools.convert.progress import Progress

log = logging.getLogger("nydusify")

DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MAX_BOOTSTRAP = 1 << 30  # refuse absurd image.boot members rather than exhaust memory


@dataclass
class CheckOptions:
    platform: str = "linux/amd64"
    work_dir: str | None = None
    source: Transport = field(default_factory=Transport)
    target: Transport = field(default_factory=Transport)
    progress_bar: bool | None = None


@dataclass
class CheckReport:
    """`problems` is empty when the target matches the source; `entries` counts compared paths."""

    problems: list[str] = field(default_factory=list)
    entries: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _bootstrap_from_layer(path: str) -> tuple[bytes, str]:
    """``image/image.boot`` from the bootstrap layer, and the sha256 of the uncompressed tar."""
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as gz:
            for piece in iter(lambda: gz.read(1 << 20), b""):
                h.update(piece)
        with tarfile.open(path, "r:gz") as tf:
            for info in tf:
                if info.name.lstrip("./") == BOOTSTRAP_NAME_IN_LAYER:
                    if not info.isreg() or info.size > MAX_BOOTSTRAP:
                        raise ConvertError(f"{BOOTSTRAP_NAME_IN_LAYER} in the bootstrap layer is not a "
                                           "regular file of sane size")  # fmt: skip
                    f = tf.extractfile(info)
                    assert f is not None
                    return f.read(), "sha256:" + h.hexdigest()
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise ConvertError(f"bootstrap layer is not a readable tar.gz: {exc}") from exc
    raise ConvertError(f"bootstrap layer has no {BOOTSTRAP_NAME_IN_LAYER}")


def _packaging_problems(img: RemoteImage, boot_diff_id: str, bs: Bootstrap) -> list[str]:
    problems: list[str] = []
    layers = img.layers
    boot = layers[-1]
    ann = boot.get("annotations") or {}
    if boot.get("mediaType") not in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        problems.append(f"bootstrap layer media type is {boot.get('mediaType')!r}, want {OCI_LAYER_GZIP}")
    if ann.get(ANNOTATION_NYDUS_FS_VERSION) != "6":
        problems.append(
            f"bootstrap layer {ANNOTATION_NYDUS_FS_VERSION} is {ann.get(ANNOTATION_NYDUS_FS_VERSION)!r}"
        )
    if ann.get(ANNOTATION_UNCOMPRESSED) != boot_diff_id:
        problems.append(f"bootstrap layer {ANNOTATION_UNCOMPRESSED} is {ann.get(ANNOTATION_UNCOMPRESSED)!r}, "
                        f"the tar's digest is {boot_diff_id}")  # fmt: skip
    table = [b.blob_id for b in bs.blobs]
    try:
        refs = json.loads(ann.get(ANNOTATION_NYDUS_REFERENCE_BLOB_IDS, "null"))
    except ValueError:
        refs = None
    if refs != table:
        problems.append(
            f"{ANNOTATION_NYDUS_REFERENCE_BLOB_IDS} is {refs!r}, the bootstrap's blob table {table}"
        )
    data_ids = []
    for d in layers[:-1]:
        dig = str(d.get("digest", ""))
        a = d.get("annotations") or {}
        if d.get("mediaType") != NYDUS_BLOB_MEDIA_TYPE:
            problems.append(
                f"data layer {dig} has media type {d.get('mediaType')!r}, want {NYDUS_BLOB_MEDIA_TYPE}"
            )
        if a.get(ANNOTATION_NYDUS_BLOB) != "true":
            problems.append(f'data layer {dig} lacks {ANNOTATION_NYDUS_BLOB}: "true"')
        if a.get(ANNOTATION_UNCOMPRESSED) not in (None, dig):
            problems.append(
                f"data layer {dig}: {ANNOTATION_UNCOMPRESSED} is {a.get(ANNOTATION_UNCOMPRESSED)!r}"
            )
        data_ids.append(dig.removeprefix("sha256:"))
    for blob_id in table:
        if blob_id not in data_ids:
            problems.append(f"the bootstrap references blob {blob_id}, which is not a layer of the image")
    want_diff_ids = ["sha256:" + i for i in data_ids] + [boot_diff_id]
    got = (img.config.get("rootfs") or {}).get("diff_ids")
    if got != want_diff_ids:
        problems.append(f"config rootfs.diff_ids {got} != layers {want_diff_ids}")
    history = img.config.get("history")
    if isinstance(history, list):
        real = sum(1 for h in history if isinstance(h, dict) and not h.get("empty_layer"))
        if real != len(layers):
            problems.append(f"config history has {real} non-empty entries for {len(layers)} layers")
    return problems


def _describe(node: Node, nlink: dict[int, int]) -> dict[str, Any]:
    """The attributes compared between source and target, as printable values."""
    d: dict[str, Any] = {
        "type": node.kind.name.lower(),
        "mode": f"{stat.S_IMODE(node.mode):04o}",
        "uid": node.uid,
        "gid": node.gid,
        "mtime": f"{node.mtime}.{node.mtime_nsec:09d}",
        "xattrs": {k.decode(errors="replace"): v.hex() for k, v in sorted(node.xattrs.items())},
    }
    if node.kind is Kind.REG:
        d["size"] = node.size
    if node.kind is Kind.SYMLINK:
        d["link_target"] = node.link_target.decode(errors="replace")
    if node.kind in (Kind.CHAR, Kind.BLOCK):
        d["rdev"] = f"{node.rdev[0]}:{node.rdev[1]}"
    if not node.is_dir:
        d["nlink"] = nlink.get(id(node), 1)
    return d


def _content_digest(node: Node) -> str:
    if node.size == 0 or node.content is None:
        return hashlib.sha256(b"").hexdigest()
    h = hashlib.sha256()
    with node.content.open() as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def compare_trees(source: Node, target: Node) -> Iterator[str]:
    """Readable differences between two final trees (no markers), in path order."""
    src = dict(sorted_walk(source))
    dst = dict(sorted_walk(target))
    src_links, dst_links = link_counts(source), link_counts(target)
    for path in sorted(src.keys() | dst.keys()):
        name = "/" + path.decode(errors="replace")
        if path not in dst:
            yield f"{name}: missing in target"
            continue
        if path not in src:
            yield f"{name}: only in target"
            continue
        a, b = _describe(src[path], src_links), _describe(dst[path], dst_links)
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                yield f"{name}: {key} source={a.get(key)!r} target={b.get(key)!r}"
        if a == b and src[path].kind is Kind.REG and src[path].size:
            try:
                same = _content_digest(src[path]) == _content_digest(dst[path])
            except RafsError as exc:
                yield f"{name}: cannot read target bytes: {exc}"
                continue
            if not same:
                yield f"{name}: file bytes differ"


def _source_tree(img: RemoteImage, work: str, bar: bool | None) -> Node:
    trees = []
    diff_ids = diff_ids_of(img.config, len(img.layers))
    for i, desc in enumerate(img.layers):
        if desc.get("mediaType") not in SOURCE_LAYER_TYPES:
            raise ConvertError(f"source layer {desc.get('digest')} has unsupported media type "
                               f"{desc.get('mediaType')!r}")  # fmt: skip
        path = os.path.join(work, f"source-{i}")
        p = Progress(f"[{i + 1}/{len(img.layers)}] pull source {str(desc['digest'])[7:19]}",
                     int(desc.get("size", 0)), bar=bar)  # fmt: skip
        download_blob(img.client, desc, path, p)
        p.finish()
        tree, _ = layer_tree(path, diff_ids[i], f"source layer {desc['digest']}")
        trees.append(tree)  # file contents stay slices of the decompressed tar in `work`
        os.unlink(path)
    return merge_layers(trees)


def image_tree(
    source: str, work: str, transport: Transport | None = None, platform: str = "linux/amd64"
) -> Node:
    """The filesystem an OCI image holds: its layers merged with overlay semantics, the way
    containerd's overlayfs snapshotter shows it (file contents stay in `work` until it is removed).
    Backend tests compare what a backend serves with it."""
    ref = parse_reference(source, "source")
    client = open_client(ref, transport or Transport())
    try:
        return _source_tree(fetch_image(client, ref, platform, "source"), work, False)
    finally:
        client.close()


def check(source: str, target: str, opts: CheckOptions | None = None) -> CheckReport:
    """Compare `target` (a nydus image) with `source` (the OCI image it was made from)."""
    opts = opts or CheckOptions()
    src_ref = parse_reference(source, "source")
    dst_ref = parse_reference(target, "target")
    own_work = opts.work_dir is None
    work = tempfile.mkdtemp(prefix="nydusify-check-") if own_work else str(opts.work_dir)
    blob_dir = os.path.join(work, "blobs")
    os.makedirs(blob_dir, exist_ok=True)
    clients: list[RegistryClient] = []
    report = CheckReport()
    try:
        src_client = open_client(src_ref, opts.source)
        clients.append(src_client)
        dst_client = open_client(dst_ref, opts.target)
        clients.append(dst_client)
        src = fetch_image(src_client, src_ref, opts.platform, "source")
        dst = fetch_image(dst_client, dst_ref, opts.platform, "target")
        if not dst.layers or ANNOTATION_NYDUS_BOOTSTRAP not in (dst.layers[-1].get("annotations") or {}):
            raise ConvertError(f"target {target} is not a nydus image: its last layer is not annotated "
                               f"{ANNOTATION_NYDUS_BOOTSTRAP}")  # fmt: skip
        boot_path = os.path.join(work, "bootstrap.tar.gz")
        p = Progress("pull bootstrap", int(dst.layers[-1].get("size", 0)), bar=opts.progress_bar)
        download_blob(dst_client, dst.layers[-1], boot_path, p)
        p.finish()
        boot, boot_diff_id = _bootstrap_from_layer(boot_path)
        try:
            bs = Bootstrap(boot)
        except RafsError as exc:
            raise ConvertError(f"target bootstrap is invalid: {exc}") from exc
        report.problems += _packaging_problems(dst, boot_diff_id, bs)

        table = {b.blob_id for b in bs.blobs}
        for i, desc in enumerate(dst.layers[:-1]):
            blob_id = str(desc.get("digest", "")).removeprefix("sha256:")
            if blob_id not in table:
                continue  # unreferenced data layer (all its files shadowed): nothing reads it
            label = f"[{i + 1}/{len(dst.layers) - 1}] pull blob {blob_id[:12]}"
            p = Progress(label, int(desc.get("size", 0)), bar=opts.progress_bar)
            download_blob(dst_client, desc, os.path.join(blob_dir, blob_id), p)
            p.finish()
        for entry in bs.blobs:
            path = os.path.join(blob_dir, entry.blob_id)
            if entry.blob_toc_size and os.path.exists(path):
                try:
                    with open(path, "rb") as f:
                        verify_blob_data(f, read_toc(f, entry.blob_id, entry.blob_toc_digest), entry.blob_id)
                except RafsError as exc:
                    report.problems.append(f"blob {entry.blob_id}: {exc}")

        source_tree = _source_tree(src, work, opts.progress_bar)
        with BlobSet.from_dir(bs, blob_dir) as blobs:
            try:
                target_tree = tree_from_erofs(bs.erofs, blobs.read_file, markers=False)
            except RafsError as exc:
                raise ConvertError(f"target bootstrap is invalid: {exc}") from exc
            report.entries = len(sorted_walk(target_tree))
            report.problems += list(compare_trees(source_tree, target_tree))
        return report
    finally:
        for c in clients:
            c.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
