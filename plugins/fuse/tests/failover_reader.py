"""Reader load for the failover tests, run as its own process (like a container).

It must not run inside the snapshotter's process: a process that spawns the replacement daemon
while it holds files open on the mount deadlocks (the forked child closes the inherited fds,
each close sends FLUSH to the mount, and nobody serves it until that very child has started).

``python failover_reader.py MNT SHA256_OF_big SECONDS``: keeps ``big`` open and reads it whole
(page cache dropped each pass), lists ``d`` and reads ``d/f7`` in another thread; prints a JSON
summary ``{"errors", "ops", "max_pause"}``. An optional fourth argument names a file whose
appearance ends the run early (SECONDS is then the upper bound). ``python failover_reader.py
--read PATH`` reads one file and prints ``{"errno"}`` (0 on success).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time


def load(mnt: str, want: str, seconds: float, stop_file: str = "") -> dict[str, object]:
    end = time.monotonic() + seconds

    def running() -> bool:
        return time.monotonic() < end and not (stop_file and os.path.exists(stop_file))

    errors: list[str] = []
    pauses = [0.0]
    names = sorted(f"f{i}" for i in range(10))

    def held() -> None:
        fd = os.open(os.path.join(mnt, "big"), os.O_RDONLY)
        try:
            while running():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t = time.monotonic()
                data = os.pread(fd, 64 << 20, 0)
                pauses.append(time.monotonic() - t)
                if hashlib.sha256(data).hexdigest() != want:
                    errors.append("held fd read wrong bytes")
        finally:
            os.close(fd)

    def fresh() -> None:
        while running():
            t = time.monotonic()
            got = sorted(os.listdir(os.path.join(mnt, "d")))
            with open(os.path.join(mnt, "d", "f7"), "rb") as f:
                data = f.read()
            pauses.append(time.monotonic() - t)
            if got != names or data != b"7" * 7:
                errors.append(f"d went wrong: {got} {data!r}")

    def guard(fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=guard, args=(f,)) for f in (held, fresh)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"errors": errors, "ops": len(pauses) - 1, "max_pause": max(pauses)}


def main() -> None:
    if sys.argv[1] == "--read":
        try:
            with open(sys.argv[2], "rb") as f:
                f.read()
            print(json.dumps({"errno": 0}))
        except OSError as e:
            print(json.dumps({"errno": e.errno}))
        return
    stop_file = sys.argv[4] if len(sys.argv) > 4 else ""
    print(json.dumps(load(sys.argv[1], sys.argv[2], float(sys.argv[3]), stop_file)))


if __name__ == "__main__":
    main()
