"""`nydus_core.cli.logsetup`: private rotating log files, upstream level names, buffered records."""

from __future__ import annotations

import gzip
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_core.cli import logsetup
from nydus_core.cli.logsetup import TRACE, BufferedRecords, level_of, setup_logging
from nydus_core.config import LogConfig


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(logsetup._installed):
        root.removeHandler(h)
        h.close()
    logsetup._installed.clear()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("name", "level"),
    [("trace", TRACE), ("debug", logging.DEBUG), ("info", logging.INFO), ("warn", logging.WARNING),
     ("warning", logging.WARNING), ("error", logging.ERROR), ("fatal", logging.CRITICAL),
     ("panic", logging.CRITICAL), ("INFO", logging.INFO)],
)  # fmt: skip
def test_level_names(name: str, level: int) -> None:
    assert level_of(name) == level


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        level_of("loud")


def test_file_is_private_and_rotates_compressed(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = setup_logging(
            LogConfig(level="info", log_rotation_max_size=1, log_rotation_max_backups=2), tmp_path / "logs"
        )
        assert path == tmp_path / "logs" / "nydus-snapshotter.log"
        log = logging.getLogger("nydus_core.test")
        log.debug("hidden at info")
        chunk = "x" * 1000
        for i in range(2500):  # ~2.5 MB: two rotations at 1 MB
            log.info("%d %s", i, chunk)
    finally:
        os.umask(old_umask)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["nydus-snapshotter.log", "nydus-snapshotter.log.1.gz", "nydus-snapshotter.log.2.gz"]
    for p in path.parent.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    with gzip.open(path.parent / "nydus-snapshotter.log.1.gz", "rt") as f:
        assert chunk in f.read()
    assert "hidden at info" not in path.read_text()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def test_uncompressed_rotation(tmp_path: Path) -> None:
    path = setup_logging(LogConfig(log_rotation_max_size=1, log_rotation_compress=False), tmp_path)
    assert path is not None
    log = logging.getLogger("nydus_core.test")
    for i in range(1200):
        log.info("%d %s", i, "y" * 1000)
    assert (tmp_path / "nydus-snapshotter.log.1").is_file()
    assert stat.S_IMODE((tmp_path / "nydus-snapshotter.log.1").stat().st_mode) == 0o640


def test_existing_file_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "nydus-snapshotter.log").write_text("old\n")
    (tmp_path / "nydus-snapshotter.log").chmod(0o666)
    setup_logging(LogConfig(), tmp_path)
    assert stat.S_IMODE((tmp_path / "nydus-snapshotter.log").stat().st_mode) == 0o640


def test_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert setup_logging(LogConfig(log_to_stdout=True, level="trace"), tmp_path) is None
    logging.getLogger("nydus_core.test").log(TRACE, "very detailed")
    assert "TRACE nydus_core.test: very detailed" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_setup_twice_does_not_duplicate(tmp_path: Path) -> None:
    setup_logging(LogConfig(), tmp_path)
    path = setup_logging(LogConfig(), tmp_path)
    assert path is not None
    logging.getLogger("nydus_core.test").warning("once")
    for h in logsetup._installed:
        h.flush()
    assert path.read_text().count("once") == 1


def test_buffered_records_replayed_into_the_file(tmp_path: Path) -> None:
    with BufferedRecords() as buffered:
        logging.getLogger("nydus_core.config").warning("early warning")
        logging.getLogger("nydus_core.config").debug("early debug")
    path = setup_logging(LogConfig(level="info"), tmp_path)
    assert path is not None
    buffered.replay()
    text = path.read_text()
    assert "WARNING nydus_core.config: early warning" in text
    assert "early debug" not in text  # still filtered by the configured level
    buffered.replay()
    assert path.read_text().count("early warning") == 1
