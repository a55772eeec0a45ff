"""Blob decoders: which one reads the chunks of a blob, and the built-in native nydus decoder.

A daemon serves a RAFS v6 bootstrap whatever format made it; what differs between formats is how
the stored bytes of a chunk become its data. Each kind is a `nydus_core.records.DecoderRecord`
(hook ``nydus_decoders``); `DecoderSet` picks, per blob, the accepting decoder with the highest
priority. This module registers the native one: nydus chunks stored raw, lz4_block, zstd or
gzip compressed (the blob's compressor; a chunk without the COMPRESSED flag is stored raw).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from nydus_core.data.rafs import RafsError
from nydus_core.data.rafs.blob import decompress
from nydus_core.data.rafs.bootstrap import CHUNK_FLAG_COMPRESSED, BlobEntry, ChunkInfo
from nydus_core.hookspecs import hookimpl
from nydus_core.records import BlobDecoder, DecoderRecord

log = logging.getLogger(__name__)

NATIVE = "nydus-native"


class NativeDecoder(BlobDecoder):
    """Native nydus blobs: each chunk's compressed extent, decompressed with the blob's compressor."""

    def accepts(self, blob: BlobEntry) -> bool:
        return True  # the fallback: every blob a nydus builder writes

    def decode(self, blob: BlobEntry, chunk: ChunkInfo, raw: bytes) -> bytes:
        what = f"blob {blob.blob_id} chunk {chunk.index}"
        if chunk.flags & CHUNK_FLAG_COMPRESSED:
            return decompress(blob.compression_algo, raw, chunk.uncompressed_size, what)
        if len(raw) < chunk.uncompressed_size:
            raise RafsError(f"{what}: {len(raw)} raw bytes, expected {chunk.uncompressed_size}")
        return raw[: chunk.uncompressed_size]


NATIVE_DECODER = NativeDecoder()


class DecoderSet:
    """The decoders a daemon knows, highest priority first; `for_blob` picks one per blob."""

    def __init__(self, records: Iterable[DecoderRecord]) -> None:
        self.records: Sequence[DecoderRecord] = sorted(records, key=lambda r: (-r.priority, r.name))

    @classmethod
    def native_only(cls) -> DecoderSet:
        return cls([DecoderRecord(name=NATIVE, decoder=NATIVE_DECODER, priority=-100)])

    def for_blob(self, blob: BlobEntry) -> BlobDecoder:
        """The decoder for `blob`; `RafsError` naming the blob when no installed one accepts it."""
        for record in self.records:
            if record.decoder.accepts(blob):
                return record.decoder
        names = ", ".join(r.name for r in self.records) or "none"
        raise RafsError(
            f"blob {blob.blob_id}: no installed decoder reads it (features {blob.features:#x}, compressor "
            f"{blob.compression_algo}; decoders: {names})"
        )


@functools.cache
def installed() -> DecoderSet:
    """The decoders of every installed plugin (a plugin manager built once per process, honouring
    the allow/deny list); native only when building it fails, which is logged.

    Only the decoder hook is called and only this module of the built-ins is loaded: a plugin
    module imports its backend lazily, so a daemon never imports the control plane."""
    from nydus_core.plugins import DAEMON_BUILTINS, build_plugin_manager, build_registry

    try:
        pm = build_plugin_manager(builtins=DAEMON_BUILTINS, registry=False)
        return DecoderSet(build_registry(pm, kinds=("decoders",)).ordered_decoders())
    except Exception:
        log.exception("cannot load the installed blob decoders; only native nydus blobs can be read")
        return DecoderSet.native_only()


def installed_soon() -> Callable[[], DecoderSet]:
    """Start finding the installed decoders in a thread (a daemon does it while it starts up);
    the returned function waits for the result."""
    thread = threading.Thread(target=installed, name="decoders", daemon=True)
    thread.start()

    def result() -> DecoderSet:
        thread.join()
        return installed()

    return result


@hookimpl
def nydus_decoders() -> Iterator[DecoderRecord]:
    # Lowest priority: a format plugin's decoder for its own blob kind is asked first.
    yield DecoderRecord(name=NATIVE, decoder=NATIVE_DECODER, priority=-100,
                        description="native nydus chunks: raw, lz4_block, zstd, gzip")  # fmt: skip
