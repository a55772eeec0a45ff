"""Network conditions: bandwidth through tc HTB on loopback, round-trip time through the proxy.

netem is not built into this kernel (env.md §7), so the RTT is added by the counting proxy as a
per-request delay, and the bandwidth by an HTB class that only matches packets whose *source*
port is the proxy's listening port, i.e. the registry's replies. Every other loopback flow
(containerd's sockets, other engineers' tests) lands in a 100 Gbit/s default class.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import attrs


@attrs.frozen
class Network:
    """One grid point: `mbit` is None when the bandwidth is not limited; `rtt_ms` per request."""

    name: str
    mbit: float | None
    rtt_ms: float

    @property
    def bytes_per_second(self) -> float | None:
        return None if self.mbit is None else self.mbit * 1e6 / 8


UNSHAPED = Network("unshaped", None, 0.0)
QUICK_GRID = (UNSHAPED, Network("100mbit-20ms", 100.0, 20.0))
SLOW_LINK = Network("3MBps-100ms", 24.0, 100.0)
FULL_GRID = (*QUICK_GRID, Network("25mbit-50ms", 25.0, 50.0), SLOW_LINK)


class ShapingError(RuntimeError):
    """tc refused a command; the message has its output."""


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    tc = shutil.which("tc") or "/usr/sbin/tc"
    proc = subprocess.run([tc, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ShapingError(f"tc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@contextmanager
def bandwidth_limit(port: int, mbit: float | None, dev: str = "lo") -> Iterator[None]:
    """Limit traffic sent from `port` on `dev` to `mbit` for the ``with`` block (no-op for None).

    The root qdisc is always removed in ``finally``: a leftover HTB on lo would slow the whole
    machine. If lo already has a root qdisc that is not ours, this refuses instead of replacing it.
    """
    if mbit is None:
        yield
        return
    current = _tc("qdisc", "show", "dev", dev).stdout
    if "htb" in current or "tbf" in current:
        raise ShapingError(f"{dev} already has a shaping qdisc (someone else's?): {current.strip()}")
    rate = f"{mbit:g}mbit"
    try:
        _tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "99")
        _tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:99", "htb", "rate", "100gbit")
        _tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", rate, "ceil", rate)
        _tc("filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "sport", str(port), "0xffff", "flowid", "1:10")
        yield
    finally:
        _tc("qdisc", "del", "dev", dev, "root", check=False)
