"""nydus-core: a containerd proxy snapshotter with lazily pulled images, in Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nydus_core.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`hookimpl` on first use: importing the package must stay cheap, because every daemon
    program imports it (``nydusd-py``'s start-up is the pause a cold failover costs); a daemon
    meets pluggy only in the thread that finds its blob decoders."""
    if name == "hookimpl":
        from nydus_core.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
