"""Fixtures of the fuse plugin's tests: a short throw-away root whose daemons die with the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_core.control.daemons.mounts import umount_tree
from nydus_core.testing.services import live_pids_mentioning


@pytest.fixture
def root() -> Iterator[Path]:
    """A short root (unix socket paths live below it). Every process whose command line names it
    (daemons, standbys, the session holder) is killed at teardown and every mount removed."""
    if os.geteuid() != 0:
        pytest.skip("needs root (FUSE mounts)")
    path = Path(tempfile.mkdtemp(prefix="nydm-", dir="/tmp"))
    yield path
    for pid in live_pids_mentioning(str(path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    umount_tree(path)
    shutil.rmtree(path, ignore_errors=True)
