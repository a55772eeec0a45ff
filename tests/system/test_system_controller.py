"""The system controller API as ``containerd-nydus-grpc`` serves it (real process, real socket).

What containerd-less checks can pin: the socket is private (0600), the endpoints answer with
upstream's JSON shapes, unknown and unimplemented paths are told apart, ``[system] enable =
false`` means no socket, and a stale socket left by a crash is replaced. Daemons and instances
in the listing are covered end to end in ``plugins/fuse/tests/e2e`` (they need containerd and FUSE).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_core.testing.services import NydusSnapshotter, ServiceError, unmount_below

pytestmark = pytest.mark.root


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the snapshotter root is created 0700 and mounts need root")
    d = Path(tempfile.mkdtemp(prefix="nydus-sys-"))  # short: unix socket paths
    yield d
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def snap(workdir: Path) -> Iterator[NydusSnapshotter]:
    s = NydusSnapshotter(workdir / "nydus", workdir / "nydus" / "nydus.sock")
    s.start()
    yield s
    s.stop()


def _raw_get(sock: Path, path: str, method: str = "GET") -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(f"{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_socket_is_private_and_lists_nothing_yet(snap: NydusSnapshotter) -> None:
    mode = stat.S_IMODE(snap.system_address.stat().st_mode)
    assert stat.S_ISSOCK(snap.system_address.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert snap.system_get("/api/v1/daemons") == []
    assert snap.system_get("/api/v1/daemons/records") == []


def test_unknown_and_unimplemented_paths(snap: NydusSnapshotter) -> None:
    status, body = _raw_get(snap.system_address, "/api/v1/nothing")
    assert status == 404 and b"no such endpoint" in body
    status, body = _raw_get(snap.system_address, "/api/v1/prefetch", method="PUT")
    assert status == 501 and b"not implemented" in body
    status, body = _raw_get(snap.system_address, "/api/v1/daemons/upgrade")
    assert status == 405 and b"takes PUT" in body
    with pytest.raises(ServiceError, match="HTTP 404"):
        snap.system_get("/api/v1/daemon")


def test_upgrade_request_errors(snap: NydusSnapshotter, workdir: Path) -> None:
    """``PUT /api/v1/daemons/upgrade`` refuses a bad body or program (400) and, under the default
    ``recover_policy = "restart"``, any upgrade (412: no supervisor holds the sessions). The happy
    path and failing programs are in plugins/fuse/tests/test_hot_upgrade.py (real daemons, root)."""
    program = workdir / "nydusd-next"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    plain = workdir / "not-executable"
    plain.write_text("")
    cases: list[tuple[object, int, str]] = [
        (b"{not json", 400, "not JSON"),
        (["/usr/bin/true"], 400, "JSON object"),
        ({}, 400, "nydusd_path is required"),
        ({"nydusd_path": 7}, 400, "must be a string"),
        ({"nydusd_path": "nydusd"}, 400, "not an absolute path"),
        ({"nydusd_path": str(workdir / "missing")}, 400, "does not exist"),
        ({"nydusd_path": str(plain)}, 400, "not executable"),
        ({"nydusd_path": str(program), "policy": "sideways"}, 400, "not supported"),
        ({"nydusd_path": str(program)}, 412, 'recover_policy = "failover"'),
    ]
    for path in ("/api/v1/daemons/upgrade", "/api/v1/nydusd/upgrade"):
        for body, want, text in cases:
            status, answer = snap.system_put(path, body)
            assert (status, answer["code"] != "") == (want, True), (body, status, answer)
            assert text in answer["message"], (body, answer)
    assert snap.system_get("/api/v1/daemons") == []


def test_socket_removed_on_stop_and_stale_one_replaced(snap: NydusSnapshotter) -> None:
    snap.stop()
    assert not snap.system_address.exists()
    # A crash leaves the socket file behind: the next start must take it over.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(snap.system_address))
    stale.close()
    snap.start()
    assert snap.system_get("/api/v1/daemons") == []


def test_disabled_means_no_socket(workdir: Path) -> None:
    config = workdir / "config.toml"
    address = workdir / "system.sock"
    config.write_text(f'version = 1\n[system]\nenable = false\naddress = "{address}"\n')
    s = NydusSnapshotter(workdir / "nydus", workdir / "nydus" / "nydus.sock",
                         extra_args=["--config", str(config)])
    s.start()
    try:
        assert not address.exists()
        assert "system controller disabled" in s.log_tail()
    finally:
        s.stop()


def test_nydusctl_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    """The happy path (info and metrics of a live daemon) runs in plugins/fuse/tests/e2e."""
    sock = tmp_path / "api.sock"
    proc = subprocess.run([sys.executable, "-m", "nydus_core.cli.nydusctl", "--sock", str(sock), "info"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"nydusctl: error: no daemon API socket at {sock}"
