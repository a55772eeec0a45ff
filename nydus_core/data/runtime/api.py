"""nydusd's HTTP API over a unix socket (reference §4.3), served by a small threaded server.

Paths and JSON follow upstream: ``GET /api/v1/daemon``, ``POST``/``DELETE
/api/v1/mount?mountpoint=/<id>``, ``GET /api/v1/metrics[/backend|/blobcache|/inflight][?id=/<id>]``.
Errors are ``{"code", "message"}`` with a 4xx/5xx status. The socket is created 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from nydus_core.data.runtime.state import ApiError, DaemonRuntime

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
# Failover / upgrade endpoints (upstream names) -> the runtime's session action.
_ACTIONS = {
    "/api/v1/daemon/fuse/sendfd": "sendfd",
    "/api/v1/daemon/fuse/takeover": "takeover",
    "/api/v1/daemon/start": "start",
    "/api/v1/daemon/exit": "exit",
}


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    runtime: DaemonRuntime


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def address_string(self) -> str:
        return "unix"

    def _reply(self, status: int, doc: Any = None) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}

    def _mount_id(self, key: str) -> str | None:
        value = self._query().get(key)
        if value is None:
            return None
        if not value.startswith("/"):
            raise ApiError(400, "EINVAL", f"{key} must start with '/': {value!r}")
        return value[1:]

    def _dispatch(self, method: str) -> None:
        rt = self.server.runtime
        path = urlparse(self.path).path.rstrip("/")
        try:
            if method == "GET" and path == "/api/v1/daemon":
                self._reply(200, rt.daemon_info())
            elif method == "GET" and path in ("/api/v1/metrics", "/api/v1/metrics/backend",
                                              "/api/v1/metrics/blobcache"):  # fmt: skip
                kind = {"/api/v1/metrics": "fs", "/api/v1/metrics/backend": "backend",
                        "/api/v1/metrics/blobcache": "blobcache"}[path]  # fmt: skip
                sid = self._mount_id("id")
                self._reply(200, rt.metrics(kind, None if sid in (None, "") else sid))
            elif method == "PUT" and path in _ACTIONS:
                rt.action(_ACTIONS[path])
                self._reply(204)
            elif method == "GET" and path == "/api/v1/metrics/inflight":
                self._reply(204)
            elif path == "/api/v1/mount" and method in ("POST", "DELETE"):
                mid = self._mount_id("mountpoint")
                if mid is None:
                    raise ApiError(400, "EINVAL", "query parameter mountpoint=/<id> is required")
                if method == "POST":
                    body = self._body()
                    if body.get("fs_type", "rafs") != "rafs":
                        raise ApiError(400, "EINVAL", f"fs_type {body.get('fs_type')!r} is not supported")
                    source, config = body.get("source"), body.get("config")
                    if not isinstance(source, str) or not isinstance(config, str):
                        raise ApiError(400, "EINVAL", "body needs string fields source and config")
                    rt.add(mid, source, config)
                else:
                    rt.remove(mid)
                self._reply(204)
            else:
                raise ApiError(404, "ENOENT", f"no endpoint {method} {path}")
        except ApiError as e:
            self._reply(e.status, {"code": e.code, "message": e.message})
        except Exception as e:  # a bug must answer 500, not drop the connection
            log.exception("api %s %s failed", method, self.path)
            self._reply(500, {"code": "EIO", "message": f"internal error: {e}"})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, "EINVAL", "request body too large")
        try:
            doc = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
            raise ApiError(400, "EINVAL", f"body is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ApiError(400, "EINVAL", "body must be a JSON object")
        return doc

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")


class ApiServer:
    """Serves the API of `runtime` on `path` in a background thread."""

    def __init__(self, path: str, runtime: DaemonRuntime) -> None:
        self.path = path
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a dead daemon
        old = os.umask(0o177)
        try:
            self._server = _Server(path, _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._server.runtime = runtime
        # A short poll: `stop` waits for the loop to notice, and a daemon leaving for a hot upgrade
        # pauses every reader until its process is gone (the default 0.5 s was most of that pause).
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="nydusd-api", daemon=True)  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
