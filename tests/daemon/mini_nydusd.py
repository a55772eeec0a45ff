"""A small stand-in for nydusd, for testing the daemon manager with real processes and mounts.

It speaks upstream's command line (``fuse --config --bootstrap --mountpoint --apisock ...``) and
HTTP API over its unix socket (``GET /api/v1/daemon``, ``POST``/``DELETE /api/v1/mount``, the
metrics endpoints), and "serves" an image with a real mount: the bootstrap file is read as JSON
``{"files": {"relative/path": "content"}}``, those files are written to a private directory, and
that directory is bind-mounted read-only at the mountpoint. A shared daemon first mounts a tmpfs
at its mountpoint and binds each attached image at ``<mountpoint>/<id>`` inside it, so like a
FUSE daemon's images they disappear with the daemon's own mount.

On SIGTERM it unmounts everything and removes its socket (as nydusd does); SIGKILL leaves the
mounts and the socket behind, which is what recovery must clean up.

Test knobs (environment): ``MINI_NYDUSD_READY_DELAY`` seconds spent in state INIT before RUNNING.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

VERSION = {
    "package_ver": "mini-0.1.0",
    "git_commit": "0" * 40,
    "build_time": "",
    "profile": "test",
    "rustc": "",
}


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mountpoint = Path(args.mountpoint)
        self.state = "INIT"
        self.lock = threading.Lock()
        self.mounts: dict[str, dict[str, Any]] = {}  # id -> {"dir": private dir, "config": dict}
        self.private_dirs: list[Path] = []
        self.shared = args.bootstrap is None
        self.log_file = open(args.log_file, "a") if args.log_file else sys.stderr  # noqa: SIM115

    def log(self, msg: str) -> None:
        self.log_file.write(f"{time.strftime('%H:%M:%S')} mini-nydusd[{os.getpid()}] {msg}\n")
        self.log_file.flush()

    def materialize(self, bootstrap: Path) -> Path:
        doc = json.loads(bootstrap.read_text())
        d = Path(tempfile.mkdtemp(prefix="mini-nydusd-img-"))
        self.private_dirs.append(d)
        for rel, content in doc.get("files", {}).items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
        return d

    @staticmethod
    def bind_ro(src: Path, dst: Path) -> None:
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)

    def start(self, stop: threading.Event) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.shared:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "mini-nydusd", str(self.mountpoint)],
                check=True,
            )
        else:
            config = json.loads(Path(self.args.config).read_text())  # must be valid JSON
            self.log(f"dedicated: device.id={config.get('device', {}).get('id')}")
            self.bind_ro(self.materialize(Path(self.args.bootstrap)), self.mountpoint)
        delay = float(os.environ.get("MINI_NYDUSD_READY_DELAY", "0") or 0)
        if delay and stop.wait(delay):
            return  # SIGTERM while still starting
        self.state = "RUNNING"
        self.log("RUNNING")

    def attach(self, sid: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if not self.shared:
            return 400, {"code": "EINVAL", "message": "not a shared daemon"}
        if body.get("fs_type") != "rafs" or not isinstance(body.get("config"), str):
            return 400, {"code": "EINVAL", "message": "want fs_type rafs and a config string"}
        try:
            config = json.loads(body["config"])
        except ValueError as e:
            return 400, {"code": "EINVAL", "message": f"config is not JSON: {e}"}
        with self.lock:
            if sid in self.mounts:
                return 409, {"code": "EEXIST", "message": f"/{sid} is already mounted"}
            d = self.materialize(Path(body["source"]))
            target = self.mountpoint / sid
            target.mkdir()
            self.bind_ro(d, target)
            self.mounts[sid] = {"dir": str(d), "config": config, "order": len(self.mounts)}
        self.log(f"mounted /{sid}")
        return 204, None

    def detach(self, sid: str) -> tuple[int, dict[str, Any] | None]:
        with self.lock:
            if sid not in self.mounts:
                return 404, {"code": "ENOENT", "message": f"/{sid} is not mounted"}
            target = self.mountpoint / sid
            subprocess.run(["umount", str(target)], check=True)
            target.rmdir()
            del self.mounts[sid]
        self.log(f"umounted /{sid}")
        return 204, None

    def shutdown(self) -> None:
        with self.lock:
            for sid in list(self.mounts):
                subprocess.run(["umount", "-l", str(self.mountpoint / sid)], check=False)
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
            for d in self.private_dirs:
                shutil.rmtree(d, ignore_errors=True)
        Path(self.args.apisock).unlink(missing_ok=True)
        self.log("exiting")


def make_handler(daemon: Daemon) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            daemon.log("api: " + format % args)

        def reply(self, status: int, doc: Any = None) -> None:
            body = b"" if doc is None else json.dumps(doc).encode()
            self.send_response(status)
            if body:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def sid(self) -> str | None:
            q = parse_qs(urlparse(self.path).query)
            mp = q.get("mountpoint", [""])[0]
            return mp[1:] if mp.startswith("/") and len(mp) > 1 else None

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/api/v1/daemon":
                self.reply(200, {"id": daemon.args.id or "", "version": VERSION, "state": daemon.state})
            elif path == "/api/v1/metrics":
                self.reply(200, {"data_read": 0, "fop_hits": [], "nr_opens": 0})
            elif path == "/api/v1/metrics/blobcache":
                self.reply(200, {"underlying_files": [], "prefetch_data_amount": 0})
            elif path == "/api/v1/metrics/inflight":
                self.reply(204)
            elif path == "/api/v1/mini/mounts":  # test introspection, not an upstream endpoint
                with daemon.lock:
                    self.reply(200, daemon.mounts)
            else:
                self.reply(404, {"code": "ENOENT", "message": f"no such endpoint {path}"})

        def do_POST(self) -> None:
            sid = self.sid()
            if urlparse(self.path).path != "/api/v1/mount" or sid is None:
                self.reply(404, {"code": "ENOENT", "message": "POST /api/v1/mount?mountpoint=/<id> only"})
                return
            length = int(self.headers.get("Content-Length", "0"))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                self.reply(400, {"code": "EINVAL", "message": "body is not JSON"})
                return
            self.reply(*daemon.attach(sid, body))

        def do_DELETE(self) -> None:
            sid = self.sid()
            if urlparse(self.path).path != "/api/v1/mount" or sid is None:
                self.reply(404, {"code": "ENOENT", "message": "DELETE /api/v1/mount?mountpoint=/<id> only"})
                return
            self.reply(*daemon.detach(sid))

    return Handler


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mini-nydusd")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fuse")
    f.add_argument("--config")
    f.add_argument("--bootstrap")
    f.add_argument("--mountpoint", required=True)
    f.add_argument("--apisock", required=True)
    f.add_argument("--log-level", default="info")
    f.add_argument("--log-file")
    f.add_argument("--log-rotation-size", type=int)
    f.add_argument("--thread-num", type=int)
    f.add_argument("--failover-policy", choices=["none", "resend", "flush"])
    f.add_argument("--id")
    f.add_argument("--supervisor")
    f.add_argument("--upgrade", action="store_true")
    f.add_argument("--prefetch-files")
    f.add_argument("--backend-source")
    args = p.parse_args(argv)
    if (args.config is None) != (args.bootstrap is None):
        p.error("--config and --bootstrap go together")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    daemon = Daemon(args)
    sock = Path(args.apisock)
    sock.unlink(missing_ok=True)
    server = Server(str(sock), make_handler(daemon))
    os.chmod(sock, 0o600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    daemon.log(f"listening on {sock}: {' '.join(argv)}")
    try:
        daemon.start(stop)
    except Exception as e:
        daemon.log(f"start failed: {e}")
        daemon.shutdown()
        return 1
    stop.wait()
    server.shutdown()
    daemon.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
