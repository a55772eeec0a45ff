"""FUSE backend of ``nydusd-py``: a pyfuse3 filesystem over the daemon's RAFS instances."""

from __future__ import annotations
