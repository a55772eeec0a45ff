"""Read load inside real containers, for the failover / restart tests and anyone else who needs it.

`build_load_image` pushes a Debian + python3 image with a known payload under ``/data`` (a large
random file, a small tree, a "poison" file) and its nydus conversion. `ContainerLoad` runs one
``ctr run`` of that image with the load program (`LOAD_PROGRAM`, stdlib python, copied into a
bind-mounted host directory ``/out``) in one of three modes:

* ``big``: keeps ``/data/big`` open for the whole run (as a long-running program would) and reads
  it whole in 1 MiB ``pread``s each pass, after dropping the file's page cache
  (``posix_fadvise(DONTNEED)``, forwarded by overlayfs to the FUSE file), so every pass is served
  by the daemon; checks the sha256 of each pass;
* ``tree``: lists every directory of ``/data/tree`` and opens and reads every file in it (cache
  dropped too), checking names and contents;
* ``fresh``: like ``big`` but opens the file anew each pass.

The program times every single operation with ``CLOCK_MONOTONIC`` (the same clock as the host's,
containers have no time namespace here), appends one line per pass to ``/out/<name>.log`` and, when
``/out/<name>.stop`` appears, writes a JSON summary line: passes, bad passes, errors (with errno),
operation count, the longest operation and the slowest ones with their start times, so a test can
line pauses up with the moments it killed a daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import attrs

from nydus_core.testing.debian_image import build_debian_py_image
from nydus_core.testing.services import Containerd, ServiceError, wait_until

__all__ = [
    "BIG_SIZE",
    "LOAD_PROGRAM",
    "ContainerLoad",
    "LoadImage",
    "LoadResult",
    "build_load_image",
    "wait_for_passes",
]

BIG_PATH = "/data/big"
TREE_ROOT = "/data/tree"
POISON_PATH = "/data/poison"
BIG_SIZE = (8 << 20) + 4321  # several MiB and not a multiple of any chunk or page size


@attrs.frozen
class LoadImage:
    """The pushed image (OCI and nydus) and what its ``/data`` payload must read as."""

    oci_ref: str
    nydus_ref: str
    big_sha256: str
    tree: dict[str, str]  # path relative to TREE_ROOT -> sha256 of its content
    poison_path: str = POISON_PATH

    def expectations(self) -> dict[str, Any]:
        return {"big": {"path": BIG_PATH, "sha256": self.big_sha256},
                "tree": {"root": TREE_ROOT, "files": self.tree}}


def _payload_tar(path: Path, seed: bytes) -> tuple[str, dict[str, str]]:
    """An uncompressed layer tarball with the ``/data`` payload; returns (sha256 of big, tree digests)."""
    files: dict[str, bytes] = {"data/big": os.urandom(BIG_SIZE), "data/poison": b"poison\n" * 9000}
    tree: dict[str, str] = {}
    for i in range(6):
        for j in range(6):
            rel = f"d{i}/f{j}"
            body = hashlib.sha256(seed + rel.encode()).hexdigest().encode() * (1 + 37 * j)
            files[f"data/tree/{rel}"] = body
            tree[rel] = hashlib.sha256(body).hexdigest()
    dirs = sorted({str(Path(name).parent) for name in files} | {"data", "data/tree"})
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(f"./{d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, body in sorted(files.items()):
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(body), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return hashlib.sha256(files["data/big"]).hexdigest(), tree


def build_load_image(workdir: Path, registry_host: str, repo: str = "nydus-load") -> LoadImage:
    """Debian + python3 plus a ``/data`` layer of random bytes, pushed and converted with nydusify."""
    workdir.mkdir(parents=True, exist_ok=True)
    layer = workdir / "data-layer.tar"
    big_sha, tree = _payload_tar(layer, secrets.token_bytes(8))
    built = build_debian_py_image(workdir / "image", registry_host, repo=repo, extra_layers=[layer])
    layer.unlink()
    return LoadImage(built.oci_ref, built.nydus_ref, big_sha, tree)


#: The load program run by ``python3`` inside the container (stdlib only).
LOAD_PROGRAM = r'''
import errno, hashlib, json, os, sys, time
mode, name = sys.argv[1], sys.argv[2]
expect = json.load(open("/out/expect.json"))
log = open(f"/out/{name}.log", "a", buffering=1)
stop = f"/out/{name}.stop"
CHUNK = 1 << 20
errors, slow = [], []
state = {"ops": 0, "max_op": 0.0, "passes": 0, "bad": 0, "errors": 0}

def timed(op, fn, *args):
    t = time.monotonic()
    try:
        return fn(*args)
    finally:
        d = time.monotonic() - t
        state["ops"] += 1
        state["max_op"] = max(state["max_op"], d)
        slow.append((d, t, op))
        if len(slow) > 200:
            slow.sort(reverse=True)
            del slow[50:]

def drop(fd):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

def read_whole(fd):
    h, off = hashlib.sha256(), 0
    while True:
        data = timed("pread", os.pread, fd, CHUNK, off)
        if not data:
            return h.hexdigest()
        h.update(data)
        off += len(data)

held = None
def big_pass(fresh):
    global held
    path = expect["big"]["path"]
    if fresh or held is None:
        if held is not None:
            os.close(held)
            held = None
        held = timed("open", os.open, path, os.O_RDONLY)
    drop(held)
    timed("fstat", os.fstat, held)
    ok = read_whole(held) == expect["big"]["sha256"]
    if fresh:
        os.close(held)
        held = None
    return ok

def tree_pass():
    root, want = expect["tree"]["root"], expect["tree"]["files"]
    got = {}
    dirs = timed("listdir", os.listdir, root)
    for d in sorted(dirs):
        for f in sorted(timed("listdir", os.listdir, os.path.join(root, d))):
            fd = timed("open", os.open, os.path.join(root, d, f), os.O_RDONLY)
            try:
                drop(fd)
                got[f"{d}/{f}"] = read_whole(fd)
            finally:
                os.close(fd)
    return got == want

log.write(f"start {time.monotonic():.6f}\n")
while not os.path.exists(stop):
    try:
        ok = tree_pass() if mode == "tree" else big_pass(mode == "fresh")
    except OSError as e:
        state["errors"] += 1
        if len(errors) < 20:
            errors.append({"errno": e.errno, "name": errno.errorcode.get(e.errno, "?"), "msg": str(e),
                           "t": time.monotonic(), "after_passes": state["passes"]})
        log.write(f"error {e.errno} {e}\n")
        if held is not None:
            try:
                os.close(held)
            except OSError:
                pass
            held = None
        time.sleep(0.05)
        continue
    state["passes"] += 1
    state["bad"] += 0 if ok else 1
    log.write(f"pass {state['passes']} {'ok' if ok else 'BAD'} {time.monotonic():.6f}\n")
slow.sort(reverse=True)
summary = dict(state, mode=mode, errors_seen=errors,
               slowest=[{"ms": round(d * 1000, 2), "t": round(t, 6), "op": op} for d, t, op in slow[:25]])
log.write("summary " + json.dumps(summary) + "\n")
'''


@attrs.frozen
class LoadResult:
    """The load program's summary, plus how its container ended."""

    name: str
    exit_code: int | None
    passes: int
    bad_passes: int
    errors: int
    errors_seen: list[dict[str, Any]]
    ops: int
    max_op_ms: float
    slowest: list[dict[str, Any]]
    stderr: str

    def errnos(self) -> set[str]:
        return {str(e["name"]) for e in self.errors_seen}


class ContainerLoad:
    """One ``ctr run --rm`` of the load image running `LOAD_PROGRAM` in `mode`, in the background.

    `out_dir` is bind-mounted at ``/out``; several loads may share it (each has its own ``name``).
    """

    def __init__(self, ctrd: Containerd, ref: str, image: LoadImage, out_dir: Path, name: str, mode: str,
                 snapshotter: str = "nydus") -> None:  # fmt: skip
        self.ctrd, self.ref, self.name, self.mode = ctrd, ref, name, mode
        self.out_dir = out_dir
        self.container_id = f"load-{name}-{secrets.token_hex(3)}"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "load.py").write_text(LOAD_PROGRAM)
        (out_dir / "expect.json").write_text(json.dumps(image.expectations()))
        self.log = out_dir / f"{name}.log"
        self._stop = out_dir / f"{name}.stop"
        self._stop.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)
        self.snapshotter = snapshotter
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = b""

    def start(self, timeout: float = 120.0) -> ContainerLoad:
        """Start the container and wait until its program runs (python starts lazily: give it time)."""
        argv = [shutil.which("ctr") or "ctr", "--address", self.ctrd.address, "-n", self.ctrd.namespace,
                "run", "--rm", "--snapshotter", self.snapshotter,
                "--mount", f"type=bind,src={self.out_dir},dst=/out,options=rbind:rw",
                self.ref, self.container_id, "python3", "/out/load.py", self.mode, self.name]  # fmt: skip
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)  # fmt: skip

        def started() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                rc = self._proc.returncode
                raise ServiceError(f"container {self.name} exited {rc} before starting: {err}")
            return self.passes() >= 1

        wait_until(started, timeout, f"the {self.name} container's first pass", interval=0.1)
        return self

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def passes(self) -> int:
        return sum(1 for line in self.lines() if line.startswith("pass "))

    def error_lines(self) -> list[str]:
        return [line for line in self.lines() if line.startswith("error ")]

    def stop(self, timeout: float = 60.0) -> LoadResult:
        """Ask the program to finish its pass and summarise; wait for the container to exit."""
        self._stop.touch()
        assert self._proc is not None, "start() first"
        try:
            _out, err = self._proc.communicate(timeout=timeout)
            self._stderr = err or b""
        except subprocess.TimeoutExpired:
            self.kill()
        return self.result()

    def kill(self) -> None:
        """SIGKILL the task (a container stuck on a dead mount cannot finish by itself)."""
        with contextlib.suppress(ServiceError):
            self.ctrd.kill_task(self.container_id)
        if self._proc is not None:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            if self._proc.stderr is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._stderr += self._proc.stderr.read()
        with contextlib.suppress(ServiceError):
            self.ctrd.ctr("containers", "delete", self.container_id, check=False, timeout=30)

    def result(self) -> LoadResult:
        summary: dict[str, Any] = {}
        for line in self.lines():
            if line.startswith("summary "):
                summary = json.loads(line[len("summary "):])
        rc = self._proc.returncode if self._proc is not None else None
        if not summary:  # killed or crashed: what the log says
            lines = self.lines()
            errs = [line for line in lines if line.startswith("error ")]
            return LoadResult(self.name, rc, self.passes(), sum(" BAD " in x for x in lines), len(errs),
                              [{"errno": e.split()[1], "name": "", "msg": e} for e in errs[:20]], 0,
                              -1.0, [], self._stderr.decode(errors="replace"))  # fmt: skip
        return LoadResult(self.name, rc, int(summary["passes"]), int(summary["bad"]), int(summary["errors"]),
                          list(summary["errors_seen"]), int(summary["ops"]), float(summary["max_op"]) * 1000,
                          list(summary["slowest"]), self._stderr.decode(errors="replace"))  # fmt: skip

    def __enter__(self) -> ContainerLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.kill()


def wait_for_passes(loads: list[ContainerLoad], at_least: dict[str, int], timeout: float) -> None:
    """Wait until each load has completed at least ``at_least[name]`` passes."""
    def done() -> bool:
        return all(load.passes() >= at_least[load.name] for load in loads)

    wait_until(done, timeout, f"passes {at_least}", interval=0.02)
