"""A fault-injecting HTTP reverse proxy for tests: counts requests and breaks them on demand.

It sits on a free loopback port in front of a real HTTP server (a docker-registry) and forwards
every request, recording what it saw. Faults are armed per test: flip one byte of a response
body, drop the connection without an answer, delay the answer, or answer with an HTTP error
instead of forwarding. Each fault applies to requests whose path contains a substring and can
be limited to the next N matching requests, so "fail twice, then work" is one line.

Only loopback is allowed on both sides, the number of concurrent requests is bounded, and the
whole thing is threads (no event loop to share with the code under test).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import attrs

__all__ = ["Fault", "FaultyProxy", "SeenRequest"]

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
}


@attrs.define
class Fault:
    """One armed fault. `kind` is ``flip``, ``drop``, ``delay``, ``status`` or ``norange``.

    `times` is how many matching requests it still applies to (``None``: until removed).
    ``flip`` xors `flip_offset` of the body with 0xFF (``-1`` = the middle byte); ``delay`` sleeps
    `seconds` before forwarding; ``status`` answers `status` without forwarding; ``norange``
    strips the ``Range`` header, so the upstream answers 200 with the whole body.
    """

    kind: str
    path_contains: str = ""
    method: str | None = None
    times: int | None = None
    flip_offset: int = -1
    seconds: float = 0.0
    status: int = 500

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and self.path_contains in path


@attrs.frozen
class SeenRequest:
    """A request the proxy received. The Authorization value is never kept, only whether it was there;
    `headers` holds the other request headers, names lower-cased."""

    method: str
    path: str
    range: str | None
    authorized: bool
    status: int
    fault: str | None
    headers: tuple[tuple[str, str], ...] = ()
    body_bytes: int = 0  # response body bytes sent to the client

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)


def _require_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"FaultyProxy only forwards to loopback, not {host!r}")


class FaultyProxy:
    """``with FaultyProxy("http://127.0.0.1:5000") as p: p.url ...``; see the module docstring."""

    def __init__(self, upstream: str, max_concurrency: int = 32, upstream_timeout: float = 30.0) -> None:
        parts = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        _require_loopback(parts.hostname)
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self._faults: list[Fault] = []
        self._seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FaultyProxy:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faulty-proxy",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # ---------------------------------------------------------------- faults and records

    def add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @contextmanager
    def fault(self, kind: str, **kwargs: object) -> Iterator[Fault]:
        """Arm a fault for the duration of a ``with`` block."""
        f = self.add_fault(Fault(kind, **kwargs))  # type: ignore[arg-type]
        try:
            yield f
        finally:
            with self._lock:
                if f in self._faults:
                    self._faults.remove(f)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(method, path):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._faults.remove(f)
                    return f
        return None

    def _record(self, req: SeenRequest) -> None:
        with self._lock:
            self._seen.append(req)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def reset_requests(self) -> None:
        with self._lock:
            self._seen.clear()

    def count(self, path_contains: str = "", method: str | None = None) -> int:
        return sum(1 for r in self.requests
                   if path_contains in r.path and (method is None or r.method == method))


def _make_handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's
        # delayed ACK (40 ms) on every response, which made lazy reads through the proxy crawl.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # silence stderr access logs
            pass

        def _handle(self) -> None:
            with proxy._slots:
                self._forward()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def _forward(self) -> None:
            method, path = self.command, self.path
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fault = proxy._take_fault(method, path)
            kind = fault.kind if fault else None
            rng, authorized = self.headers.get("Range"), "Authorization" in self.headers
            seen_headers = tuple(
                (k.lower(), v) for k, v in self.headers.items() if k.lower() != "authorization"
            )

            def record(status: int, nbytes: int = 0) -> None:
                proxy._record(SeenRequest(method, path, rng, authorized, status, kind, seen_headers, nbytes))

            if fault is not None and fault.kind == "drop":
                record(0)
                self.close_connection = True
                with suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "status":
                payload = f"injected HTTP {fault.status}\n".encode()
                record(fault.status)
                self.send_response(fault.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=proxy.upstream_timeout)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if kind == "norange" and k.lower() == "range":
                        continue
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        conn.putheader(k, v)
                if body or method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read() if method != "HEAD" else b""
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                status = resp.status
            except OSError:
                record(502)
                self.send_error(502, "upstream unreachable")
                return
            finally:
                conn.close()
            if fault is not None and fault.kind == "flip" and data:
                i = fault.flip_offset if fault.flip_offset >= 0 else len(data) // 2
                if i < len(data):
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            record(status, len(data))
            self.send_response_only(status)
            for k, v in headers:
                if k.lower() == "content-length" and method != "HEAD":
                    continue
                self.send_header(k, v)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

    return Handler
