"""The backend-neutral part of ``nydusd-py``: config, RAFS instances over the blob cache, HTTP API.

A filesystem backend (FUSE in ``plugins/fuse``) only translates kernel requests into the
inode-level operations of `instance.RafsInstance` and tells the `runtime.DaemonRuntime` when it
is serving.
"""

from __future__ import annotations

__version__ = "0.1.0"
