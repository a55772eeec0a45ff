"""CPython's cyclic garbage collector paused while a TOC is parsed and converted.

A layer's conversion makes some 100,000 container objects (JSON objects, entries, tree nodes,
the writer's inodes) in a tenth of a second, and none of them is garbage before it ends; the
collector, triggered by allocation counts, would scan the growing young generations (and, now and
then, the whole process heap) over and over meanwhile, for nothing: a third of the conversion's
time in `bench/estargz_convert.py`. What the conversion drops is freed by reference counting as
usual; the writer's cyclic leftovers go at the next collection after it.

The collector is per process: a depth count under a lock keeps conversions overlapping in threads
from switching it back on early, and it is switched back on only if it was on when the first of
them began.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_resume = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block (nor in other threads while it runs)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
