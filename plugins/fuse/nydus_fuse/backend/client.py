"""The FUSE-session part of nydusd's HTTP API (failover and hot upgrade)."""

from __future__ import annotations

from nydus_core.control.daemons.client import NydusdClient


class FuseSessionClient(NydusdClient):
    """`NydusdClient` plus upstream's FUSE session endpoints; the daemon must run with ``--supervisor``."""

    def send_fd(self) -> None:
        """Have the daemon push its state and FUSE fd to its supervisor."""
        self._request("PUT", "/api/v1/daemon/fuse/sendfd")

    def takeover(self) -> None:
        """Have a daemon waiting in INIT fetch state and FUSE fd from its supervisor."""
        self._request("PUT", "/api/v1/daemon/fuse/takeover")
