"""Logging for the console scripts: upstream's ``[log]`` section and ``--log-*`` flags.

The snapshotter logs to ``<log dir>/nydus-snapshotter.log`` (rotated by size, rotated files
optionally gzip-compressed and pruned by age and count), or to stdout with ``--log-to-stdout``
(what a systemd unit or a test harness wants). The file is created ``0640``: it names images,
paths and daemons, which other local users have no business reading.

Configuration problems are found before the log file can be opened (its directory comes from the
configuration), so `BufferedRecords` holds the records emitted while loading and replays them
into the real handlers afterwards; an unknown-key warning therefore lands in the log file.
"""

from __future__ import annotations

import gzip
import io
import logging
import logging.handlers
import os
import shutil
import sys
import time
from pathlib import Path

from nydus_core.config import LogConfig

LOG_FILE_NAME = "nydus-snapshotter.log"
LOG_FILE_MODE = 0o640
LOG_DIR_MODE = 0o750

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

# Upstream (logrus) level names -> logging levels.
LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"

# Handlers this module installed on the root logger; replaced on the next `setup_logging` call
# so that calling `main()` twice in one process (tests) does not double every line.
_installed: list[logging.Handler] = []


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotating log file created ``0640``, with optional gzip and age-based pruning.

    The standard handler opens files with the process umask (typically ``0644``) and never
    deletes old backups by age, which upstream's lumberjack does (``log_rotation_max_age``).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        backup_count: int,
        compress: bool,
        max_age_days: int,
    ) -> None:
        self.compress = compress
        self.max_age_days = max_age_days
        super().__init__(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=False)
        if compress:
            self.namer = lambda name: name + ".gz"
            self.rotator = _gzip_rotator

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE)
        os.fchmod(fd, LOG_FILE_MODE)  # also tighten a file left by an older version
        return os.fdopen(fd, "a", encoding="utf-8")

    def doRollover(self) -> None:
        super().doRollover()
        self._prune_by_age()

    def _prune_by_age(self) -> None:
        if self.max_age_days <= 0:
            return
        base = Path(self.baseFilename)
        cutoff = time.time() - self.max_age_days * 86400
        for old in base.parent.glob(base.name + ".*"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass


def _gzip_rotator(source: str, dest: str) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_FILE_MODE)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as dst:
        shutil.copyfileobj(src, dst)
    os.unlink(source)


class BufferedRecords(logging.Handler):
    """Collects records until logging is configured, then hands them to the real handlers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> BufferedRecords:
        root = logging.getLogger()
        self._saved_level = root.level
        root.addHandler(self)
        if root.level > logging.DEBUG or root.level == logging.NOTSET:
            root.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._saved_level)

    def replay(self) -> None:
        """Pass every buffered record to the root logger's current handlers, once."""
        root = logging.getLogger()
        for record in self.records:
            if record.levelno >= root.getEffectiveLevel():
                for handler in root.handlers:
                    if record.levelno >= handler.level:
                        handler.handle(record)
        self.records.clear()


def level_of(name: str) -> int:
    """The `logging` level for an upstream level name (``trace`` ... ``panic``)."""
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r} (one of {', '.join(LEVELS)})") from None


def setup_logging(log: LogConfig, log_dir: Path) -> Path | None:
    """Configure the root logger from the ``[log]`` section; return the log file (``None``: stdout).

    :param log: the merged ``[log]`` settings (flags already applied).
    :param log_dir: where the file goes (``[log] dir`` or ``<root>/logs``).
    """
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed.clear()

    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    formatter.converter = time.localtime if log.log_rotation_local_time else time.gmtime
    path: Path | None = None
    handler: logging.Handler
    if log.log_to_stdout:
        handler = logging.StreamHandler(sys.stdout)
    else:
        log_dir.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)
        path = log_dir / LOG_FILE_NAME
        handler = PrivateRotatingFileHandler(
            path,
            max_bytes=max(log.log_rotation_max_size, 0) * 1024 * 1024,
            backup_count=log.log_rotation_max_backups,
            compress=log.log_rotation_compress,
            max_age_days=log.log_rotation_max_age,
        )
    handler.setFormatter(formatter)
    root.addHandler(handler)
    _installed.append(handler)
    root.setLevel(level_of(log.level))
    # grpc's C core logs through absl to stderr on its own; keep its Python logger quiet unless
    # the operator asked for debug output.
    logging.getLogger("grpc").setLevel(max(root.level, logging.INFO))
    return path
