"""EROFS and RAFS (nydus) image formats: readers, writer, the tree model.

Layouts are described in ``shared/reference/formats.md`` §1-2; the Linux kernel is the final judge
of what the writer produces (tests mount it).
"""

from __future__ import annotations


class RafsError(ValueError):
    """An image, blob or tar is malformed or unsupported; the message names what and where."""


class DigestMismatch(RafsError):
    """A chunk's bytes do not hash to the digest the metadata promises (corrupt or tampered blob)."""
