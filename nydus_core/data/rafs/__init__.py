"""EROFS and RAFS (nydus) image formats: readers, writer, the tree model.

Layouts are described in ``shared/reference/formats.md`` §1-2; the Linux kernel is the final judge
of what the writer produces (tests mount it).

Modules:

* `erofs` - EROFS structures (superblock + checksum, inodes, dirents, xattrs, device slots) and
  `ErofsImage`, a bounds-checked reader (lookup, readdir, walk, flat and chunk-based data).
* `blob` - native nydus blobs: chunk codecs (none / lz4_block / zstd), digests (blake3 / sha256),
  reverse-tar sections and the ToC, the ci table (v1 / v2), `BlobReader.read_chunk` (verified).
* `bootstrap` - RAFS v6 on top of EROFS: extension superblock, blob table, chunk table, prefetch
  table; `BlobSet` reads files / ranges / chunks of an image from its blobs.
* `v5` - read-only RAFS v5 (`RafsV5`, `tree_from_v5`).
* `tree` - the one tree model (`Node`): from a layer tar, a directory, a bootstrap; overlay merge;
  back to a tar.
* `writer` - tree -> bootstrap + blob (`build`, `build_to_paths`), layer merge (`merge_bootstraps`).

The `nydus-image` console script (`nydus_core.cli.nydus_image`) wraps these.
"""

from __future__ import annotations


class RafsError(ValueError):
    """An image, blob or tar is malformed or unsupported; the message names what and where."""


class DigestMismatch(RafsError):
    """A chunk's bytes do not hash to the digest the metadata promises (corrupt or tampered blob)."""
