"""Short, sortable, unique daemon ids, shaped like upstream's xids (20 base32hex characters).

The id names the daemon's socket, config and log directories, so it must be short (unix socket
paths are limited to 108 bytes) and unique across snapshotter restarts.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
import time

_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))
_lock = threading.Lock()
_node = os.urandom(5)


def new_daemon_id() -> str:
    """12 bytes (4 of seconds, 5 random per process, 3 of a counter) in lowercase base32hex."""
    with _lock:
        n = next(_counter) & 0xFFFFFF
    raw = int(time.time()).to_bytes(4, "big") + _node + n.to_bytes(3, "big")
    return base64.b32hexencode(raw).decode().lower().rstrip("=")
