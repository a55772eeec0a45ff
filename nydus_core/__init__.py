"""nydus-core: a containerd proxy snapshotter with lazily pulled images, in Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nydus_core.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`hookimpl` on first use: importing the package must stay cheap, because `nydusd-py` (whose
    start-up is the pause a failover costs) imports it and needs no pluggy."""
    if name == "hookimpl":
        from nydus_core.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
