"""The blob cache: lazily fetched, digest-verified chunks kept in sparse per-blob files.

`source` says where compressed chunk bytes come from (a local blob directory or a registry range
reader), `chunk_map` remembers durably which chunks are ready, `blobcache` ties them together
with single-flight fetches, amplified range reads, prefetch and usage accounting.
"""

from __future__ import annotations


class CacheError(OSError):
    """A chunk could not be fetched, decoded or verified; the message names the blob and chunk."""
