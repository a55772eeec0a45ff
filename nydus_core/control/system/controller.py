"""The system controller: upstream's ``[system]`` HTTP API on a private unix socket.

Operators (and our tests) ask a running snapshotter which daemons it manages and which images
each serves, without reading its databases. Served endpoints (upstream's paths and JSON names):

* ``GET /api/v1/daemons``: one object per daemon known to the daemon manager: ``id``, ``pid``,
  ``fs_driver`` (ours), ``api_socket``, ``supervisor_path`` (from the daemon's backend), ``reference``
  (number of images it serves),
  ``mountpoint``, ``startup_cpu_utilization``, ``memory_rss_kb``, ``read_data_kb`` and
  ``instances`` (snapshot id -> ``{snapshot_id, snapshot_dir, mountpoint, image_id}``);
* ``GET /api/v1/daemons/records``: the daemon records as persisted in ``nydus.db``;
* ``PUT /api/v1/daemons/upgrade`` (also upstream's documented ``/api/v1/nydusd/upgrade``), body
  ``{"nydusd_path": "/abs/path", "version": "...", "policy": "..."}`` (only ``nydusd_path``
  required): hot upgrade of every daemon to that program (`DaemonManager.upgrade`). 200 with
  ``{"upgraded": [...]}``; 400 for a bad body or program, 412 when ``recover_policy`` is not
  ``failover``, 409 while another upgrade runs, 500 when a daemon could not be upgraded (the
  message says which program serves it now).

Prefetch and backend-source endpoints are not implemented; they answer 501 with a message, so a
client can tell "not here" from "wrong path" (404). Errors are ``{"code", "message"}``.

The socket is created under a temporary name, made ``0600`` (owner `uid`/`gid` from the
config), then renamed into place, so there is no moment where another user could connect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from nydus_core.control.daemons.client import NydusdClient
from nydus_core.control.daemons.model import DaemonRecord, Instance
from nydus_core.control.daemons.store import daemon_to_doc

log = logging.getLogger(__name__)

API_DAEMONS = "/api/v1/daemons"
API_RECORDS = "/api/v1/daemons/records"
API_UPGRADE = ("/api/v1/daemons/upgrade", "/api/v1/nydusd/upgrade")
NOT_IMPLEMENTED = ("/api/v1/prefetch",)
MAX_BODY = 1 << 16
METRICS_TIMEOUT = 1.0  # a hung daemon must not hang the listing


class DaemonSource(Protocol):
    """What the controller reads: the daemon manager (`nydus_core.control.daemons.manager.DaemonManager`)."""

    def daemons(self) -> list[DaemonRecord]: ...

    def instances(self) -> list[Instance]: ...

    def describe(self, daemon: DaemonRecord) -> dict[str, Any]:
        """The owning backend's extra fields for the daemon's entry (``supervisor_path``, ...)."""
        ...


class Upgrader(Protocol):
    """A daemon source that can hot-upgrade its daemons (`DaemonManager.upgrade`)."""

    def upgrade(self, program: str, version: str = "", policy: str = "") -> list[dict[str, Any]]: ...


class SystemControllerError(Exception):
    """The controller cannot listen (another process serves the socket, or bind failed)."""


class BadRequest(Exception):
    """The request body is not what the endpoint takes (answered 400)."""


def parse_upgrade_body(body: bytes) -> tuple[str, str, str]:
    """``(nydusd_path, version, policy)`` from upstream's JSON body; `BadRequest` when malformed."""
    try:
        doc = json.loads(body or b"null")
    except ValueError as e:
        raise BadRequest(f"body is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadRequest('body must be a JSON object like {"nydusd_path": "/path/to/nydusd"}')
    values = []
    for key in ("nydusd_path", "version", "policy"):
        value = doc.get(key, "")
        if not isinstance(value, str):
            raise BadRequest(f"{key} must be a string, not {type(value).__name__}")
        values.append(value)
    if not values[0]:
        raise BadRequest("nydusd_path is required")
    return values[0], values[1], values[2]


def error_status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and error code of an exception raised by the daemon manager."""
    from nydus_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument

    if isinstance(exc, BadRequest | InvalidArgument):
        return 400, "InvalidArgument"
    if isinstance(exc, AlreadyExists):
        return 409, "Conflict"
    if isinstance(exc, FailedPrecondition):
        return 412, "FailedPrecondition"
    return 500, "Internal"


def _rss_kb(pid: int) -> int:
    """Resident set size of `pid` from /proc, 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _read_data_kb(api_socket: Path) -> float:
    """Bytes the daemon has served to readers (``data_read`` of its metrics), in KiB; 0 if unknown."""
    if not api_socket.exists():
        return 0.0
    try:
        with NydusdClient(api_socket, timeout=METRICS_TIMEOUT) as client:
            doc = client.metrics()
        return float(doc.get("data_read", 0)) / 1024 if isinstance(doc, dict) else 0.0
    except Exception:  # a dead or busy daemon still gets listed
        return 0.0


def instance_info(inst: Instance) -> dict[str, Any]:
    return {
        "snapshot_id": inst.snapshot_id,
        "snapshot_dir": str(inst.snapshot_dir),
        "mountpoint": str(inst.mountpoint),
        "image_id": inst.image_ref,
    }


def daemon_info(
    daemon: DaemonRecord, instances: list[Instance], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One entry of ``GET /api/v1/daemons`` (upstream's ``daemonInfo``); `extra` are the owning
    backend's fields (`DaemonSource.describe`), upstream's ``supervisor_path`` among them."""
    served = [i for i in instances if i.daemon_id == daemon.id]
    info = {
        "id": daemon.id,
        "pid": daemon.pid,
        "fs_driver": daemon.fs_driver,
        "api_socket": str(daemon.api_socket),
        "supervisor_path": "",
        "reference": len(served),
        "mountpoint": str(daemon.mountpoint),
        "startup_cpu_utilization": 0.0,
        "memory_rss_kb": float(_rss_kb(daemon.pid)) if daemon.pid else 0.0,
        "read_data_kb": _read_data_kb(daemon.api_socket),
        "instances": {i.snapshot_id: instance_info(i) for i in served},
    }
    info.update(extra or {})
    return info


def list_daemons(source: DaemonSource) -> list[dict[str, Any]]:
    instances = source.instances()
    return [daemon_info(d, instances, source.describe(d)) for d in source.daemons()]


def list_records(source: DaemonSource) -> list[dict[str, Any]]:
    """The persisted records (the store's documents), or the in-memory ones if there is no store."""
    store = getattr(source, "store", None)
    records = store.list_daemons() if store is not None else source.daemons()
    return [daemon_to_doc(d) for d in records]


class _UnixHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True

    def __init__(self, path: Path, handler: type[BaseHTTPRequestHandler], uid: int, gid: int) -> None:
        self._uid, self._gid = uid, gid
        super().__init__(str(path), handler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        """Bind under a temp name, restrict it, then rename: never briefly world-connectable."""
        final = Path(str(self.server_address))
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        self.socket.bind(str(tmp))
        try:
            os.chmod(tmp, 0o600)
            if self._uid or self._gid:
                os.chown(tmp, self._uid, self._gid)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # the handler expects a (host, port) pair


def _make_handler(
    routes: dict[str, Callable[[], Any]], puts: dict[str, Callable[[bytes], Any]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            log.debug("system controller: " + format, *args)

        def _send(self, status: int, doc: Any) -> None:
            body = (json.dumps(doc) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            route = routes.get(path)
            if route is None:
                self._not_found(path)
                return
            try:
                self._send(200, route())
            except Exception as exc:
                log.exception("system controller: GET %s failed", path)
                self._send(500, {"code": "Internal", "message": f"{type(exc).__name__}: {exc}"})

        def _not_found(self, path: str) -> None:
            if path in puts and self.command != "PUT":
                message = f"{path} takes PUT, not {self.command}"
                self._send(405, {"code": "MethodNotAllowed", "message": message})
            elif path in NOT_IMPLEMENTED or path in API_UPGRADE:
                self._send(501, {"code": "NotImplemented", "message": f"{path} is not implemented"})
            else:
                self._send(404, {"code": "NotFound", "message": f"no such endpoint: {self.command} {path}"})

        def _body(self) -> bytes:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as e:
                raise BadRequest("bad Content-Length") from e
            if length < 0 or length > MAX_BODY:
                raise BadRequest(f"body of {length} bytes (at most {MAX_BODY})")
            return self.rfile.read(length) if length else b""

        def do_PUT(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            route = puts.get(path)
            if route is None:
                self._not_found(path)
                return
            try:
                result = route(self._body())
            except Exception as exc:
                status, code = error_status(exc)
                if status == 500:
                    log.error("system controller: PUT %s failed: %s", path, exc)
                self._send(status, {"code": code, "message": str(exc)})
                return
            self._send(200, result)

        def do_POST(self) -> None:
            self._not_found(self.path.split("?", 1)[0].rstrip("/"))

        do_DELETE = do_POST

    return Handler


class SystemController:
    """The API server; `start` listens and serves on a thread, `stop` closes and removes the socket."""

    def __init__(self, address: Path, source: DaemonSource, uid: int = 0, gid: int = 0) -> None:
        self.address = Path(address)
        self.source = source
        self.uid, self.gid = uid, gid
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SystemController:
        """Listen on `address`, replacing a stale socket; refuse one another process answers on."""
        if self.address.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                try:
                    probe.connect(str(self.address))
                except OSError:
                    pass  # stale: the bind below replaces it
                else:
                    raise SystemControllerError(f"another process serves on {self.address}")
        self.address.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        routes: dict[str, Callable[[], Any]] = {
            API_DAEMONS: lambda: list_daemons(self.source),
            API_RECORDS: lambda: list_records(self.source),
        }
        puts: dict[str, Callable[[bytes], Any]] = {}
        if callable(getattr(self.source, "upgrade", None)):
            for path in API_UPGRADE:
                puts[path] = self._upgrade
        try:
            self._server = _UnixHTTPServer(self.address, _make_handler(routes, puts), self.uid, self.gid)
        except OSError as exc:
            raise SystemControllerError(f"cannot listen on {self.address}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="system-controller", daemon=True)
        self._thread.start()
        log.info("system controller listening on %s", self.address)
        return self

    def _upgrade(self, body: bytes) -> dict[str, Any]:
        program, version, policy = parse_upgrade_body(body)
        log.info("system controller: hot upgrade of every daemon to %s (version %r, policy %r)",
                 program, version, policy)  # fmt: skip
        upgrader: Upgrader = self.source  # type: ignore[assignment]  # checked in start()
        return {"upgraded": upgrader.upgrade(program, version, policy)}

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with contextlib.suppress(OSError):
            self.address.unlink()
