"""Debug-level logging of every snapshots RPC the snapshotter serves.

Done as a thin subclass of `Snapshotter` so the gRPC service and server stay untouched: each
public operation logs its arguments (labels redacted like hook traces), its outcome and its
duration. At the default ``info`` level none of this is formatted.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from nydus_core.control.snapshot.snapshotter import Snapshotter
from nydus_core.plugins import redact

log = logging.getLogger("nydus_core.rpc")

F = TypeVar("F", bound=Callable[..., Any])

# Snapshotter method -> the RPC containerd calls.
RPCS = {
    "prepare": "Prepare",
    "view": "View",
    "mounts": "Mounts",
    "commit": "Commit",
    "remove": "Remove",
    "stat": "Stat",
    "update": "Update",
    "list": "List",
    "usage": "Usage",
    "cleanup": "Cleanup",
}


def _logged(rpc: str, method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Snapshotter, *args: Any, **kwargs: Any) -> Any:
        if not log.isEnabledFor(logging.DEBUG):
            return method(self, *args, **kwargs)
        shown = ", ".join([redact(a) for a in args] + [f"{k}={redact(v)}" for k, v in kwargs.items()])
        start = time.monotonic()
        try:
            result = method(self, *args, **kwargs)
        except Exception as exc:
            ms = (time.monotonic() - start) * 1000
            log.debug("%s(%s) failed after %.1f ms: %s: %s", rpc, shown, ms, type(exc).__name__, exc)
            raise
        ms = (time.monotonic() - start) * 1000
        log.debug("%s(%s) -> %s (%.1f ms)", rpc, shown, redact(result), ms)
        return result

    return wrapper  # type: ignore[return-value]


class LoggingSnapshotter(Snapshotter):
    """A `Snapshotter` whose public operations log at debug level (logger ``nydus_core.rpc``)."""


for _name, _rpc in RPCS.items():
    setattr(LoggingSnapshotter, _name, _logged(_rpc, getattr(Snapshotter, _name)))
