"""Serving the snapshots API on a unix socket, the way containerd's proxy plugin dials it.

The socket must never be reachable by other users, not even for an instant: the umask is
tightened around the bind (the socket is created 0600), then it is opened up to 0660 and handed
to ``uid:gid`` (upstream's ``--uid``/``--gid`` options let a group, e.g. a containerd running
as another user, connect).
"""

from __future__ import annotations

import logging
import os
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

    def stop(self, grace: float = 0.5) -> None:
        """Stop serving; in-flight calls get at most min(grace, 0.8) s. Returns within a second."""
        t0 = time.monotonic()
        event = self.server.stop(min(max(grace, 0.0), 0.8))
        event.wait(max(0.0, 0.95 - (time.monotonic() - t0)))
        try:
            if stat.S_ISSOCK(os.lstat(self.address).st_mode):
                os.unlink(self.address)
        except FileNotFoundError:
            pass

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
        os.unlink(address)  # stale socket of a previous run

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
            port = server.add_insecure_port(f"unix://{address}")
        finally:
            os.umask(old)
    if port == 0 or not address.exists():
        raise OSError(f"cannot listen on unix socket {address}")
    os.chmod(address, 0o660)
    os.chown(address, uid, gid)
    server.start()
    log.info("serving snapshots API on %s", address)
    return RunningServer(server, address)
