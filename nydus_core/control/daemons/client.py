"""Client of the nydusd HTTP API over its unix socket (upstream ``pkg/daemon/client.go``).

The URL host is ignored by the daemon; we use ``http://nydusd``. Success is 200 or 204; errors
come back as JSON ``{"code": ..., "message": ...}`` and are raised as `NydusdApiError` so the
caller can tell "the daemon said no" from "nobody answers" (`NydusdUnreachable`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Self

import attrs
import httpx

DEFAULT_TIMEOUT = 30.0

STATE_INIT = "INIT"
STATE_READY = "READY"
STATE_RUNNING = "RUNNING"


class NydusdApiError(Exception):
    """The daemon answered with an error status."""

    def __init__(self, method: str, path: str, status: int, code: str, message: str) -> None:
        super().__init__(f"nydusd {method} {path}: HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class NydusdUnreachable(Exception):
    """The API socket does not exist or nobody accepts connections on it."""


@attrs.frozen
class DaemonInfo:
    """``GET /api/v1/daemon``: the daemon's id, state and version facts."""

    id: str
    state: str
    version: dict[str, Any]
    raw: dict[str, Any]


class NydusdClient:
    """One daemon's API. Cheap to create; holds one httpx client bound to the socket."""

    def __init__(self, api_socket: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.api_socket = Path(api_socket)
        # verify=False: plain HTTP over a unix socket, never TLS. With the default, httpx builds an
        # SSL context and loads the CA bundle for every client: 25-90 ms each, which the
        # failover path (several clients between a death and the replacement serving) paid.
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.api_socket), verify=False),
            base_url="http://nydusd",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transport -----------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> httpx.Response:
        if not self.api_socket.exists():
            raise NydusdUnreachable(f"nydusd API socket {self.api_socket} does not exist")
        kwargs: dict[str, Any] = {"params": params}
        if body is not None:
            kwargs["content"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        try:
            resp = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            raise NydusdUnreachable(f"nydusd API socket {self.api_socket}: {e}") from e
        if resp.status_code not in (200, 204):
            code, message = "", resp.text
            try:
                err = resp.json()
                code, message = str(err.get("code", "")), str(err.get("message", resp.text))
            except (ValueError, AttributeError):
                pass
            raise NydusdApiError(method, path, resp.status_code, code, message)
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._request(method, path, **kw)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    # API -----------------------------------------------------------------------------------

    def daemon_info(self) -> DaemonInfo:
        doc = self._json("GET", "/api/v1/daemon") or {}
        version = doc.get("version") or {}
        return DaemonInfo(
            id=str(doc.get("id", "")),
            state=str(doc.get("state", "")),
            version=version if isinstance(version, dict) else {"package_ver": str(version)},
            raw=doc,
        )

    def state(self) -> str:
        return self.daemon_info().state

    def mount(self, snapshot_id: str, bootstrap: Path, config_json: str) -> None:
        """Attach a RAFS instance at ``<daemon mountpoint>/<snapshot_id>`` (shared daemons)."""
        body = {"fs_type": "rafs", "source": str(bootstrap), "config": config_json}
        self._request("POST", "/api/v1/mount", params={"mountpoint": f"/{snapshot_id}"}, body=body)

    def umount(self, snapshot_id: str) -> None:
        self._request("DELETE", "/api/v1/mount", params={"mountpoint": f"/{snapshot_id}"})

    def metrics(self, sid: str = "") -> Any:
        return self._json("GET", "/api/v1/metrics", params={"id": f"/{sid}"} if sid else None)

    def blobcache_metrics(self, sid: str = "") -> Any:
        return self._json("GET", "/api/v1/metrics/blobcache", params={"id": f"/{sid}"} if sid else None)

    def inflight_metrics(self) -> Any:
        return self._json("GET", "/api/v1/metrics/inflight")

    # session control (after a takeover, the old side of a hot upgrade)
    def start(self) -> None:
        """Have a daemon that took over a session serve it."""
        self._request("PUT", "/api/v1/daemon/start")

    def exit(self) -> None:
        """Have the daemon exit without unmounting (the old side of a hot upgrade)."""
        self._request("PUT", "/api/v1/daemon/exit")

    def wait_state(self, state: str = STATE_RUNNING, timeout: float = 10.0, interval: float = 0.05) -> bool:
        """Poll ``GET /api/v1/daemon`` until it reports `state`; False when `timeout` passes first.

        An unreachable socket counts as "not yet" (the daemon may still be starting); an error
        answer from a reachable daemon is raised.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.state() == state:
                    return True
            except NydusdUnreachable:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
