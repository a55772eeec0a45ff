"""Per-layer progress: a redrawn bar on a terminal, one log line per finished step otherwise.

A bar is only useful to a person watching; in CI logs or pipes it would be noise (carriage
returns), so the bar is drawn only when the stream is a terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("nydusify")

_BAR_WIDTH = 30


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Progress of one step (``pull layer 2/3 sha256:ab12…``) of `total` bytes (0 = unknown)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done_bytes = 0
        self.stream = stream if stream is not None else sys.stdout
        self.bar = self.stream.isatty() if bar is None else bar
        self._started = time.monotonic()
        self._last_draw = 0.0
        if self.bar:
            self._draw()

    def update(self, n: int) -> None:
        self.done_bytes += n
        if self.bar:
            now = time.monotonic()
            if now - self._last_draw >= 0.1:  # redraw at most 10 times a second
                self._last_draw = now
                self._draw()

    def _draw(self, end: str = "") -> None:
        if self.total:
            frac = min(1.0, self.done_bytes / self.total)
            filled = int(frac * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            text = f"\r{self.label} [{bar}] {frac * 100:5.1f}% {human(self.done_bytes)}/{human(self.total)}"
        else:
            text = f"\r{self.label} {human(self.done_bytes)}"
        self.stream.write(text + end)
        self.stream.flush()

    def finish(self, note: str = "") -> None:
        """Close the bar (or log one line) with the elapsed time and an optional note."""
        elapsed = time.monotonic() - self._started
        if self.bar:
            self._draw(end=f" {elapsed:.1f}s{' ' + note if note else ''}\n")
        else:
            log.info(
                "%s: %s in %.1fs%s", self.label, human(self.done_bytes), elapsed, f" ({note})" if note else ""
            )
