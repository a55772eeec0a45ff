"""``nydusctl``: ask one running daemon (nydusd or nydusd-py) about itself over its API socket.

Upstream's tool of the same name is how operators look at a daemon without the snapshotter;
the command line follows it: ``nydusctl --sock <api.sock> info`` and ``nydusctl --sock
<api.sock> metrics [--category fs|backend|blobcache|inflight] [--id <snapshot id>]``, with
``--raw`` for the daemon's JSON as is. The socket path of every daemon is in the snapshotter's
system API (``GET /api/v1/daemons`` -> ``api_socket``).

Exit status: 0 on success, 1 when the daemon cannot be reached or answers with an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

PROG = "nydusctl"
CATEGORIES = {
    "fs": "/api/v1/metrics",
    "backend": "/api/v1/metrics/backend",
    "blobcache": "/api/v1/metrics/blobcache",
    "inflight": "/api/v1/metrics/inflight",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Query a nydus daemon over its API socket.")
    p.add_argument("--sock", required=True, type=Path, help="the daemon's API socket (api.sock)")
    p.add_argument("--raw", action="store_true", help="print the daemon's JSON answer unchanged")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="daemon id, state and version")
    m = sub.add_parser("metrics", help="filesystem, backend, blob cache or in-flight metrics")
    m.add_argument("--category", "-c", choices=sorted(CATEGORIES), default="fs")
    m.add_argument("--id", default="", help="snapshot id of one image of a shared daemon")
    return p


def query(sock: Path, path: str, params: dict[str, str] | None, timeout: float) -> Any:
    """GET `path` on the daemon; raise `RuntimeError` with a one-line reason on failure."""
    if not sock.exists():
        raise RuntimeError(f"no daemon API socket at {sock}")
    transport = httpx.HTTPTransport(uds=str(sock), verify=False)  # unix socket: no TLS, no CA bundle to load
    try:
        with httpx.Client(transport=transport, base_url="http://nydusd", timeout=timeout) as client:
            resp = client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach the daemon at {sock}: {exc}") from exc
    if resp.status_code >= 400:
        try:
            doc = resp.json()
            reason = f"{doc.get('code', '')}: {doc.get('message', '')}"
        except ValueError:
            reason = resp.text.strip()
        raise RuntimeError(f"GET {path}: HTTP {resp.status_code} {reason}")
    return resp.json() if resp.content else None


def _lines(doc: Any, prefix: str = "") -> list[str]:
    """Flatten a JSON document into ``key: value`` lines (nested keys joined with dots)."""
    if isinstance(doc, dict):
        out: list[str] = []
        for key, value in doc.items():
            out += _lines(value, f"{prefix}{key}.") if isinstance(value, dict | list) else [
                f"{prefix}{key}: {value}"
            ]
        return out
    if isinstance(doc, list):
        return [line for i, item in enumerate(doc) for line in _lines(item, f"{prefix}{i}.")] or [
            f"{prefix.rstrip('.')}: []"
        ]
    return [f"{prefix.rstrip('.')}: {doc}"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            doc = query(args.sock, "/api/v1/daemon", None, args.timeout)
        else:
            params = {"id": f"/{args.id}"} if args.id else None
            doc = query(args.sock, CATEGORIES[args.category], params, args.timeout)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if args.raw:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(_lines(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
