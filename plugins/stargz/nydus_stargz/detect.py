"""The ``estargz`` image format: eStargz layers claimed at Prepare, found under containers.

Layer Prepare (``claim_layer``), with ``[experimental] enable_stargz``:

1. a layer that carries nydus labels is not ours; one without an image reference and a layer
   digest (``cri.*`` or ``remote/stargz.*`` labels) cannot be read lazily, and is unpacked;
2. the probe: one ranged GET of the blob's tail (after a HEAD for its size). No eStargz or stargz
   footer there means a plain ``tar.gz``: containerd unpacks it as the overlayfs snapshotter would;
   a registry that cannot be reached is logged and the layer is unpacked too (containerd's own
   download then reports the failure);
3. the TOC member (often inside the tail already) is read, its JSON checked against the
   ``containerd.io/snapshot/stargz/toc.digest`` label when the layer carries one (a mismatch is an
   error at Prepare), converted (`nydus_stargz.bootstrap`) and written into the snapshot as
   ``<digest hex>`` (the bootstrap, upstream's name), ``stargz.index.json`` and
   ``<digest hex>.json`` (its prefetch paths and whether it has whiteouts); the snapshot is
   committed with ``containerd.io/snapshot/stargz``.

One contiguous run of eStargz layers is served lazily per image: an eStargz layer above a plain
layer that itself sits above claimed ones is unpacked (logged), so the overlay order stays exactly
containerd's.

Container Prepare/View (``find_image``): the nearest run of claimed layers is merged into
``image.boot`` in the top layer's snapshot (once; atomically) and served by the configured
backend; the plain layers around it stay lower dirs where they are (`ImageSource.covers`). A run
of one layer without whiteouts needs no merge: its own bootstrap is served.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.image_config import build_config, load_template
from nydus_core.control.snapshot.model import ChainEntry, ImageSource, Layer, LayerClaim
from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.bootstrap import Bootstrap
from nydus_core.data.rafs.writer import merge_bootstraps
from nydus_core.data.remote.backend import client_from_backend_config
from nydus_core.data.remote.errors import RegistryError
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.errors import FailedPrecondition, InvalidArgument
from nydus_core.records import ImageFormat
from nydus_stargz.bootstrap import build_layer
from nydus_stargz.toc import (
    TOC_NAME,
    Footer,
    TocError,
    parse_footer,
    parse_toc,
    read_toc_member,
)

log = logging.getLogger(__name__)

FORMAT = "estargz"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
TAIL_PROBE = 64 << 10  # the footer and, for most layers, the whole TOC in one GET
MERGED = "image.boot"


def layer_digest(labels: dict[str, str]) -> str | None:
    return labels.get(L.CRI_LAYER_DIGEST) or labels.get(L.STARGZ_DIGEST)


def is_stargz_layer(labels: dict[str, str]) -> bool:
    return bool(labels.get(L.STARGZ))


def _hex(digest: str) -> str:
    hex_ = digest.removeprefix("sha256:")
    if not digest.startswith("sha256:") or len(hex_) != 64 or not all(c in "0123456789abcdef" for c in hex_):
        raise InvalidArgument(f"layer digest {digest!r} is not a sha256 digest")
    return hex_


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _layer_meta(upper: Path, hex_: str) -> dict[str, Any]:
    """What `claim_layer` recorded of a layer (`{}` when the file is missing or unreadable)."""
    try:
        doc = json.loads((upper / f"{hex_}.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class EstargzFormat(ImageFormat):
    """eStargz layers, detected by their footer and served through a RAFS v6 bootstrap."""

    def __init__(self) -> None:
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()
        self._merge_locks: dict[str, threading.Lock] = {}

    def enabled(self, config: SnapshotterConfig) -> bool:
        return config.experimental.enable_stargz

    # -- registry ------------------------------------------------------------------------------
    def _client(self, ref: str, labels: dict[str, str]) -> RegistryClient:
        """A client for the image's repository, configured as the daemons are (scheme, TLS,
        mirrors, credentials from the hooks), reused across layers."""
        config = self.ctx.config
        template = load_template(Path(config.daemon.nydusd_config))
        doc = build_config(
            template,
            image_ref=ref,
            rafs_key="estargz",
            cache_dir=self.ctx.root / "cache",
            labels=labels,
            hooks=self.ctx.hooks,
            remote=config.remote,
        )
        backend: dict[str, Any] = doc["device"]["backend"]
        if backend.get("type", "registry") != "registry":
            raise FailedPrecondition(
                f"eStargz layers need a registry backend, the nydusd template has {backend.get('type')!r}"
            )
        key = json.dumps(backend["config"], sort_keys=True)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = client_from_backend_config(backend["config"])
            return client

    # -- layers --------------------------------------------------------------------------------
    def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        labels = layer.labels
        if L.is_nydus_meta_layer(labels) or L.is_nydus_data_layer(labels):
            return None
        digest, ref = layer_digest(labels), L.image_ref(labels)
        if not digest or not ref:
            return None
        if self._above_plain_after_run(layer.chain):
            log.info(
                "layer %s: eStargz is served lazily for one run of layers per image; this one is "
                "above a plain layer above that run, so it is unpacked",
                digest,
            )
            return None
        hex_ = _hex(digest)
        try:
            client = self._client(ref, labels)
            size = client.blob_size(digest)
            start = max(0, size - TAIL_PROBE)
            tail = client.read_range(digest, start, size - start)
        except (RegistryError, OSError) as e:
            log.warning(
                "layer %s of %s: eStargz probe failed (%s); unpacking it as a plain layer", digest, ref, e
            )
            return None
        what = f"eStargz layer {digest} of {ref}"
        want = labels.get(TOC_DIGEST)
        try:
            footer = parse_footer(tail, size)
        except TocError as e:
            if want:  # the layer says it is eStargz: a missing or cut footer is damage, not a plain layer
                raise InvalidArgument(f"{what} (labelled {TOC_DIGEST}): {e}") from None
            log.info("layer %s: not eStargz (%s); unpacking it", digest, e)
            return None
        try:
            member = self._toc_member(client, digest, size, start, tail, footer)
            toc_file = read_toc_member(member)
            if want and want != toc_file.digest:
                raise InvalidArgument(
                    f"{what}: TOC digest {toc_file.digest} does not match the layer's "
                    f"{TOC_DIGEST} {want}; refusing the layer"
                )
            if not want:
                log.warning("%s has no %s label: its TOC is trusted as served", what, TOC_DIGEST)
            toc = parse_toc(toc_file.json_bytes)
            built = build_layer(toc, toc_file, blob_id=hex_, blob_size=size, toc_offset=footer.toc_offset)
        except TocError as e:
            raise InvalidArgument(f"{what}: {e}") from None
        except (RegistryError, OSError) as e:
            raise FailedPrecondition(f"{what}: reading its TOC failed: {e}") from None
        upper = layer.upper
        _write_atomic(upper / TOC_NAME, toc_file.json_bytes)
        meta = {"prefetch": list(built.prefetch), "markers": built.markers}
        _write_atomic(upper / f"{hex_}.json", json.dumps(meta).encode())
        _write_atomic(upper / hex_, built.bootstrap)
        log.info(
            "%s: TOC of %d entries converted (%d chunks of at most %d bytes, %d files to prefetch)",
            what,
            len(toc.entries),
            built.blob.chunk_count,
            built.chunk_size,
            len(built.prefetch),
        )
        return LayerClaim(format=FORMAT, labels={L.STARGZ: "true"})

    @staticmethod
    def _toc_member(
        client: RegistryClient, digest: str, size: int, start: int, tail: bytes, footer: Footer
    ) -> bytes:
        end = size - footer.size
        if footer.toc_offset >= start:
            return tail[footer.toc_offset - start : end - start]
        head = client.read_range(digest, footer.toc_offset, start - footer.toc_offset)
        return head + tail[: end - start]

    @staticmethod
    def _above_plain_after_run(chain: Sequence[ChainEntry]) -> bool:
        """Whether the parents hold a plain layer with claimed eStargz layers beneath it."""
        plain_seen = False
        for entry in chain:  # nearest first
            if is_stargz_layer(entry.labels):
                if plain_seen:
                    return True
            else:
                plain_seen = True
        return False

    # -- containers ----------------------------------------------------------------------------
    def find_image(
        self, key: str, chain: Sequence[ChainEntry], config: SnapshotterConfig
    ) -> ImageSource | None:
        run: list[ChainEntry] = []
        below = False  # plain layers under the run: its merged image keeps its whiteouts for them
        for entry in chain:
            if is_stargz_layer(entry.labels):
                run.append(entry)
            elif run:
                below = True
                break
        if not run:
            return None
        top = run[0]
        ref = L.image_ref(top.labels)
        if ref is None:
            raise FailedPrecondition(
                f"eStargz snapshot {top.id} ({top.name}) for {key} has no image reference label"
            )
        merged = top.upper / MERGED
        if len(run) == 1 and not merged.is_file():
            digest = layer_digest(top.labels)
            hex_ = _hex(digest) if digest else ""
            if hex_ and not _layer_meta(top.upper, hex_).get("markers", True):
                merged = top.upper / hex_  # nothing to merge, no marker to translate
        if not merged.is_file():
            self._merge(run, merged, keep_markers=below)
        return ImageSource(
            format=FORMAT,
            meta_id=top.id,
            bootstrap=merged,
            image_ref=ref,
            labels=dict(top.labels),
            covers=tuple(e.id for e in run),
        )

    def _merge(self, run: Sequence[ChainEntry], merged: Path, keep_markers: bool) -> None:
        with self._lock:
            lock = self._merge_locks.setdefault(str(merged), threading.Lock())
        with lock:
            if merged.is_file():
                return
            layers = []
            prefetch: list[str] = []
            for entry in reversed(run):  # lowest first
                digest = layer_digest(entry.labels)
                if not digest:
                    raise FailedPrecondition(
                        f"eStargz snapshot {entry.id} ({entry.name}) has no layer digest label"
                    )
                hex_ = _hex(digest)
                path = entry.upper / hex_
                try:
                    layers.append(Bootstrap.open(path))
                    prefetch += _layer_meta(entry.upper, hex_).get("prefetch", [])
                except (OSError, ValueError, RafsError) as e:
                    raise FailedPrecondition(
                        f"eStargz snapshot {entry.id} ({entry.name}): its bootstrap "
                        f"{path} cannot be read: {e}"
                    ) from None
            try:
                result = merge_bootstraps(
                    layers,
                    whiteout_spec="overlayfs",
                    prefetch=prefetch,
                    prefetch_skip_missing=True,
                    keep_markers=keep_markers,
                )
            except RafsError as e:
                ids = ", ".join(e.id for e in run)
                raise FailedPrecondition(f"eStargz layers {ids}: merge failed: {e}") from None
            _write_atomic(merged, result.bootstrap)
            log.info(
                "eStargz image of %d layers merged into %s (%d prefetch files)",
                len(run),
                merged,
                len(prefetch),
            )
