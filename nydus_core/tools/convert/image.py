"""Reading images from a registry for the converter and the checker.

`open_client` turns a reference and the nydusify transport options into a `RegistryClient`
(credentials from the docker config; TLS verified unless the registry is marked insecure).
`fetch_image` resolves a tag to one platform's manifest and its config; `download_blob` streams a
blob to a file and refuses it unless its sha256 and size are what the descriptor promised, so no
converted or checked image is ever built from bytes the registry got wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.tree import Node, tree_from_tar
from nydus_core.data.remote.auth import from_docker_config
from nydus_core.data.remote.errors import BlobNotFound, RegistryAuthError, RegistryError
from nydus_core.data.remote.reference import ImageRef, parse_ref
from nydus_core.data.remote.registry import RegistryClient
from nydus_core.errors import InvalidArgument
from nydus_core.tools.convert.constants import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from nydus_core.tools.convert.progress import Progress

log = logging.getLogger("nydusify")


class ConvertError(Exception):
    """The image cannot be converted or checked; the message says which image and why."""


@dataclass(frozen=True)
class Transport:
    """How to reach one registry: `insecure` skips TLS verification (and falls back to plain http
    when the registry does not speak TLS at all), `plain_http` uses http from the start."""

    insecure: bool = False
    plain_http: bool = False


@dataclass
class RemoteImage:
    """One platform's image: the manifest as pushed, its parsed JSON and the config."""

    ref: ImageRef
    client: RegistryClient
    manifest_digest: str
    manifest_media_type: str
    manifest: dict[str, Any]
    config_raw: bytes
    config: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)


def _credentials(host: str) -> Any:
    return from_docker_config(host)


def open_client(ref: ImageRef, transport: Transport) -> RegistryClient:
    """A client for `ref`'s repository; checks the registry answers (``GET /v2/``) so transport and
    auth problems show up before any work is done."""
    client = RegistryClient(ref.api_host, ref.repo, credentials_provider=_credentials,
                            plain_http=transport.plain_http, skip_verify=transport.insecure)  # fmt: skip
    try:
        client.ping()
        return client
    except RegistryAuthError:
        raise
    except RegistryError as exc:
        client.close()
        if not transport.insecure or transport.plain_http or exc.status:
            raise
        log.info("%s does not answer over https (%s); insecure registry: trying plain http", ref.host, exc)
    client = RegistryClient(ref.api_host, ref.repo, credentials_provider=_credentials, plain_http=True)
    client.ping()
    return client


def parse_reference(text: str, what: str) -> ImageRef:
    try:
        return parse_ref(text)
    except InvalidArgument as exc:
        raise ConvertError(f"{what} reference: {exc}") from exc


def _platform_matches(entry: dict[str, Any], platform: str) -> bool:
    want_os, _, rest = platform.partition("/")
    want_arch, _, want_variant = rest.partition("/")
    p = entry.get("platform") or {}
    if p.get("os") != want_os or p.get("architecture") != want_arch:
        return False
    return not want_variant or p.get("variant") == want_variant


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ConvertError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConvertError(f"{what} is not a JSON object")
    return doc


def fetch_image(client: RegistryClient, ref: ImageRef, platform: str, what: str) -> RemoteImage:
    """Resolve `ref` (tag or digest; an index picks `platform`) to its manifest and config."""
    name = f"{ref.host}/{ref.repo}:{ref.tag}" if not ref.digest else f"{ref.host}/{ref.repo}@{ref.digest}"
    reference = ref.digest or ref.tag
    try:
        top = client.get_manifest(reference)
    except BlobNotFound as exc:
        raise ConvertError(f"{what} image {name} not found") from exc
    doc = _json(top.data, f"manifest of {name}")
    media_type = doc.get("mediaType") or top.media_type
    manifest_digest, data = top.digest, top.data
    if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST) or (not media_type and "manifests" in doc):
        chosen = [m for m in doc.get("manifests", []) if _platform_matches(m, platform)]
        if not chosen:
            have = sorted({"/".join(filter(None, (m.get("platform", {}).get(k) for k in
                                                   ("os", "architecture", "variant"))))
                           for m in doc.get("manifests", [])})  # fmt: skip
            raise ConvertError(f"{what} image {name} has no {platform} manifest (it has: {', '.join(have)})")
        entry = chosen[0]
        sub = client.get_manifest(entry["digest"])
        manifest_digest, data = entry["digest"], sub.data
        doc = _json(data, f"manifest {entry['digest']} of {name}")
        media_type = doc.get("mediaType") or entry.get("mediaType") or sub.media_type
    if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise ConvertError(f"{what} image {name}: unsupported manifest media type {media_type!r}")
    config_desc = doc.get("config")
    if not isinstance(config_desc, dict) or "digest" not in config_desc:
        raise ConvertError(f"{what} image {name}: manifest has no config descriptor")
    try:
        config_raw = client.read_blob(config_desc["digest"])
    except BlobNotFound as exc:
        raise ConvertError(f"{what} image {name}: config {config_desc['digest']} is missing") from exc
    config = _json(config_raw, f"config of {name}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ConvertError(f"{what} image {name}: manifest has no layer list")
    return RemoteImage(ref, client, manifest_digest, media_type, doc, config_raw, config, layers)


def download_blob(client: RegistryClient, desc: dict[str, Any], dest: str, progress: Progress) -> str:
    """Stream blob `desc` into `dest`; returns its sha256 hex. A digest or size mismatch removes the
    file and raises `ConvertError`."""
    digest = str(desc.get("digest", ""))
    algo, _, want = digest.partition(":")
    if algo != "sha256" or len(want) != 64:
        raise ConvertError(f"blob digest {digest!r} is not a sha256 digest")
    h = hashlib.sha256()
    size = 0
    tmp = dest + ".part"
    try:
        with open(tmp, "wb") as out, client.open_blob(digest) as chunks:
            for piece in chunks:
                out.write(piece)
                h.update(piece)
                size += len(piece)
                progress.update(len(piece))
        if h.hexdigest() != want:
            raise ConvertError(f"blob {digest} from {client.host}/{client.repo} has sha256:{h.hexdigest()}")
        if "size" in desc and int(desc["size"]) != size:
            raise ConvertError(f"blob {digest} is {size} bytes, its descriptor says {desc['size']}")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return want


_TAR_BLOCK = 512


def _open_decompressed(raw: BinaryIO) -> BinaryIO:
    head = raw.read(4)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def layer_tree(path: str, diff_id: str | None, what: str) -> tuple[Node, str]:
    """Decompress layer `path` to ``path + '.tar'`` and parse it into a layer tree.

    The tar stream's sha256 is checked against `diff_id` (the config's ``rootfs.diff_ids``) when one
    is given. A stream that stops right after its last member's data (no padding or end-of-archive
    blocks: umoci writes such layers, and Go's tar reader accepts them) is padded, since Python's
    tar reader rejects it. Returns the tree, whose file contents are slices of the ``.tar`` file
    (keep it until the tree is used), and the ``.tar`` path.
    """
    out_path = path + ".tar"
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as raw, open(out_path, "wb") as out:
            src = _open_decompressed(raw)
            for piece in iter(lambda: src.read(1 << 20), b""):
                out.write(piece)
                h.update(piece)
                size += len(piece)
            if size % _TAR_BLOCK:
                log.warning("%s: tar stream ends inside a block (no end-of-archive marker); padding it", what)
            out.write(b"\0" * (-size % _TAR_BLOCK + 2 * _TAR_BLOCK))
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise ConvertError(f"{what}: cannot decompress: {exc}") from exc
    if diff_id is not None and "sha256:" + h.hexdigest() != diff_id:
        raise ConvertError(
            f"{what}: uncompressed sha256:{h.hexdigest()} differs from the config's diff id {diff_id}"
        )
    try:
        return tree_from_tar(out_path), out_path
    except RafsError as exc:
        raise ConvertError(f"{what}: {exc}") from exc


def diff_ids_of(config: dict[str, Any], layers: int) -> list[str | None]:
    """The config's diff ids, one per layer, or ``None``s when the config does not list them right."""
    ids = (config.get("rootfs") or {}).get("diff_ids")
    if isinstance(ids, list) and len(ids) == layers:
        return [str(i) for i in ids]
    log.warning(
        "config rootfs.diff_ids does not list %d layers; uncompressed layers are not verified", layers
    )
    return [None] * layers
