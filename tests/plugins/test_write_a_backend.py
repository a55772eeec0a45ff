"""docs/write-a-backend.md, executed: a third-party backend built from the page alone.

The page's ``# file:`` code blocks are written into a directory outside the repository, installed
with pip as the distribution they describe, and their test -- the backend conformance suite --
runs in a new pytest process that sees the distribution only through its entry point. That
process's snapshotter selects the backend by ``fs_driver``, pulls a nydus image made by our
``nydusify`` through containerd, compares every file with the source image, runs containers and
removes everything. No core code knows the backend.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_core.testing.services import snapshotter_executable

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "write-a-backend.md"
MAX_LINES = 150  # the bound for a backend distribution written from the hooks alone

pytestmark = [pytest.mark.containerd, pytest.mark.root]


def guide_files() -> dict[str, str]:
    """``name -> text`` of every code block of the guide that starts with ``# file: <name>``."""
    found = {}
    for body in re.findall(r"```\w+\n(.*?)```", GUIDE.read_text(), re.S):
        match = re.match(r"# file: (\S+)\n", body)
        if match:
            found[match.group(1)] = body
    return found


def test_the_guide_has_the_whole_distribution() -> None:
    files = guide_files()
    assert set(files) == {"pyproject.toml", "erofs_local.py", "test_erofs_local.py"}
    lines = sum(text.count("\n") for text in files.values())
    assert lines < MAX_LINES, f"the guide's backend distribution has {lines} lines"


def test_backend_written_from_the_guide(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts EROFS and runs containers: needs root")
    src, site = tmp_path / "erofs-local", tmp_path / "site"
    src.mkdir()
    for name, text in guide_files().items():
        (src / name).write_text(text)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    proc = subprocess.run(
        [*pip, "--target", str(site), str(src)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    }
    env.pop("NYDUS_CORE_PLUGINS_DENY", None)
    env.pop("NYDUS_CORE_PLUGINS_ALLOW", None)

    listed = subprocess.run(
        [snapshotter_executable(), "--list-plugins"], capture_output=True, text=True, timeout=60, env=env
    )
    assert listed.returncode == 0, listed.stderr
    (row,) = [
        line.split(None, 4) for line in listed.stdout.splitlines() if line.startswith("backend  erofs-local")
    ]
    assert row[:4] == ["backend", "erofs-local", "erofs-local", "0.1.0"] and "no_daemon" in row[4]

    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("*.toml", "erofs_local.py"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_erofs_local.py"],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b4 passed, 1 skipped\b", proc.stdout), tail
    assert "erofs-local runs no daemons: nothing to kill" in proc.stdout, tail
