"""Serving the snapshots API on a unix socket, the way containerd's proxy plugin dials it.

The socket must never be reachable by other users, not even for an instant: the umask is
tightened around the bind (the socket is created 0600), then it is opened up to 0660 and handed
to ``uid:gid`` (upstream's ``--uid``/``--gid`` options let a group, e.g. a containerd running
as another user, connect).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from nydus_core.control.snapshot.service import SnapshotsService
from nydus_core.control.snapshot.snapshotter import Snapshotter

log = logging.getLogger(__name__)

# containerd pulls layers in parallel and CRI polls Walk+Usage while containers start; the
# benchmark drives 16 concurrent clients. Threads mostly wait on I/O, so be generous.
MAX_WORKERS = 32
MAX_MESSAGE = 64 * 1024 * 1024
MAX_UNIX_PATH = 105  # bytes of a socket path grpc binds (sun_path: 108 with the NUL; grpc adds "//")

_umask_lock = threading.Lock()


class OneLineGrpcErrors(logging.Filter):
    """grpc logs a request it cannot even decode ("Exception deserializing message!") with a full
    traceback, once per request: a client sending garbage would flood the log. The caller gets
    its status either way; the log keeps one line with the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


_ONE_LINE = OneLineGrpcErrors()


class RunningServer:
    """A started gRPC server bound to a unix socket."""

    def __init__(self, server: grpc.Server, address: Path) -> None:
        self.server = server
        self.address = address
        st = os.lstat(address)
        self._bound = (st.st_dev, st.st_ino)

    def stop(self, grace: float = 0.5) -> None:
        """Stop serving; in-flight calls get at most min(grace, 0.8) s. Returns within a second.

        The socket goes first (if it is still ours, not a successor's), so that a client dialling
        meanwhile finds none, which containerd retries every 10 ms, rather than one that refuses."""
        t0 = time.monotonic()
        try:
            st = os.lstat(self.address)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.address)
        except FileNotFoundError:
            pass
        event = self.server.stop(min(max(grace, 0.0), 0.8))
        event.wait(max(0.0, 0.95 - (time.monotonic() - t0)))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (for console scripts)."""
        return bool(self.server.wait_for_termination(timeout))


def serve(snapshotter: Snapshotter, address: Path, uid: int = 0, gid: int = 0) -> RunningServer:
    """Listen on ``unix://<address>`` and serve `snapshotter` from a thread pool."""
    for name in ("grpc._common", "grpc._server"):
        if _ONE_LINE not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_ONE_LINE)
    address = Path(address).absolute()
    if not address.parent.exists():
        address.parent.mkdir(mode=0o700, parents=True)
    try:
        st = os.lstat(address)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{address} exists and is not a socket; refusing to replace it")
    # Bound beside the address and renamed onto it (replacing a stale socket of a previous run)
    # once it listens: `address` never names a socket that refuses. containerd dials a missing
    # socket again every 10 ms, but after "connection refused" it backs off (1 s, 1.6 s, ... up
    # to 3 s in 1.6) and fails every call until its next try, while we serve.
    # (a name of its own: grpc removes the path it bound when a server stops, maybe later)
    staged = address.with_name(f".{address.name}.{os.getpid()}.{secrets.token_hex(3)}")
    if len(os.fsencode(str(staged))) > MAX_UNIX_PATH:  # no room: bind in place
        staged = address
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)

    server = grpc.server(
        ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="snapshots"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    with _umask_lock:
        old = os.umask(0o177)
        try:
            port = server.add_insecure_port(f"unix://{staged}")
        finally:
            os.umask(old)
    if port == 0 or not staged.exists():
        raise OSError(f"cannot listen on unix socket {address}")
    os.chmod(staged, 0o660)
    os.chown(staged, uid, gid)
    if staged != address:
        os.replace(staged, address)
    server.start()
    log.info("serving snapshots API on %s", address)
    return RunningServer(server, address)
