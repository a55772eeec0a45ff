"""eStargz test images made with Debian's ``ctr-remote`` (stargz-snapshotter 0.12), cached per machine.

Given a running `nydus_core.testing.services.Containerd` and a plain OCI image in a local
plain-http docker-registry, these put an eStargz image into the same registry:

* `convert_estargz`: ``ctr image pull --plain-http SRC``, ``ctr-remote image convert --estargz
  --oci SRC DST``, ``ctr image push --plain-http DST``: every layer becomes an eStargz blob (gzip
  members per file and chunk, a TOC at the end), with no prefetch landmark, so a lazy snapshotter
  fetches only what is read;
* `optimize_estargz`: ``ctr-remote image optimize --oci`` runs the workload once in a container
  (containerd's default snapshotter, runc, fanotify), records the files it opens and puts them
  first in each layer behind a prefetch landmark: the stargz project's "optimized" image, which
  a lazy snapshotter prefetches in one range per layer at mount time.

Both check that every layer of the pushed manifest carries the TOC digest annotation
(`TOC_DIGEST_ANNOTATION`) and return the pushed reference. They are idempotent (the local image
DST is replaced) and cached: the result is kept as an OCI layout under
``$NYDUS_TEST_CACHE/estargz/<key>`` (default ``/var/cache/nydus-core-tests``), the key being the
source's uncompressed layer digests (``rootfs.diff_ids``, stable across rebuilds of the same root
filesystem, unlike the manifest digest), the operation and its arguments and the ``ctr-remote``
binary; a hit is one ``skopeo copy --preserve-digests`` into the registry. A failing tool raises
`EstargzError` with the command and the tail of its output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nydus_core.testing.services import Containerd

__all__ = [
    "ESTARGZ_CACHE_DIR",
    "TOC_DIGEST_ANNOTATION",
    "EstargzError",
    "convert_estargz",
    "manifest_digest",
    "optimize_estargz",
    "toc_digests",
]

#: The layer annotation (and, through containerd's unpacker, snapshot label) naming the TOC digest.
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
#: Where converted images are kept between runs (``None`` as `cache_dir` turns the cache off).
ESTARGZ_CACHE_DIR = Path(os.environ.get("NYDUS_TEST_CACHE", "/var/cache/nydus-core-tests")) / "estargz"

_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
_TAIL = 3000


class EstargzError(RuntimeError):
    """A conversion step failed; the message has the command and the tail of its output."""


# ------------------------------------------------------------------------------------ helpers


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EstargzError(f"{name} not found on PATH: apt-get install {package}")
    return path


def _run(argv: Sequence[str], timeout: float) -> str:
    """Run `argv`; its stdout, or `EstargzError` with the command and its output's tail."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise EstargzError(f"{' '.join(argv)} timed out after {timeout:.0f}s; stderr tail:\n"
                           f"{err[-_TAIL:]}") from None
    if proc.returncode != 0:
        raise EstargzError(f"{' '.join(argv)} failed ({proc.returncode}); stderr tail:\n"
                           f"{proc.stderr[-_TAIL:]}\nstdout tail:\n{proc.stdout[-_TAIL // 3:]}")
    return proc.stdout


def _ctr(containerd: Containerd, namespace: str, *args: str, timeout: float) -> str:
    proc = containerd.ctr(*args, namespace=namespace, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise EstargzError(f"ctr -n {namespace} {' '.join(args)} failed ({proc.returncode}); stderr tail:\n"
                           f"{proc.stderr[-_TAIL:]}")
    return proc.stdout


def _ctr_remote(containerd: Containerd, namespace: str, *args: str, timeout: float) -> str:
    exe = _tool("ctr-remote", "stargz-snapshotter")
    return _run([exe, "--address", containerd.address, "-n", namespace, *args], timeout)


def _split_ref(ref: str) -> tuple[str, str, str]:
    """``host:port/repo/path:tag`` -> (host:port, repo/path, tag)."""
    host, rest = ref.split("/", 1)
    repo, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag:
        repo, tag = rest, "latest"
    return host, repo, tag


def _get(url: str, accept: str | None = None, method: str = "GET") -> tuple[bytes, dict[str, str]]:
    req = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except (urllib.error.URLError, OSError) as e:
        raise EstargzError(f"{method} {url}: {e}") from None


def _manifest(ref: str) -> tuple[dict[str, Any], str]:
    """`ref`'s manifest (from its plain-http registry) and its digest."""
    host, repo, tag = _split_ref(ref)
    body, headers = _get(f"http://{host}/v2/{repo}/manifests/{tag}", _ACCEPT)
    doc: dict[str, Any] = json.loads(body)
    if "layers" not in doc:
        raise EstargzError(f"{ref}: not a single-platform image manifest ({doc.get('mediaType')})")
    digest = headers.get("docker-content-digest") or "sha256:" + hashlib.sha256(body).hexdigest()
    return doc, digest


def manifest_digest(ref: str) -> str:
    """The digest of `ref`'s manifest in its plain-http registry."""
    return _manifest(ref)[1]


def toc_digests(ref: str) -> list[str | None]:
    """The TOC digest annotation of each layer of `ref`'s manifest (``None`` where it is missing)."""
    doc, _ = _manifest(ref)
    return [(layer.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION) for layer in doc["layers"]]


def _diff_ids(ref: str) -> list[str]:
    host, repo, _ = _split_ref(ref)
    doc, _ = _manifest(ref)
    body, _ = _get(f"http://{host}/v2/{repo}/blobs/{doc['config']['digest']}")
    ids: list[str] = json.loads(body)["rootfs"]["diff_ids"]
    return ids


def _cache_key(src_ref: str, operation: dict[str, Any]) -> str:
    exe = Path(_tool("ctr-remote", "stargz-snapshotter"))
    st = exe.stat()
    doc = {"diff_ids": _diff_ids(src_ref), "op": operation, "tool": [str(exe), st.st_size, st.st_mtime_ns]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _check_estargz(dst_ref: str) -> str:
    """Every layer of the pushed `dst_ref` names its TOC; returns the manifest digest."""
    doc, digest = _manifest(dst_ref)
    missing = [i for i, layer in enumerate(doc["layers"])
               if TOC_DIGEST_ANNOTATION not in (layer.get("annotations") or {})]
    if missing:
        raise EstargzError(f"{dst_ref}: layers {missing} have no {TOC_DIGEST_ANNOTATION} annotation "
                           "(not eStargz?)")
    return digest


def _from_cache(entry: Path, dst_ref: str) -> bool:
    """Push the cached layout to `dst_ref`; true when the registry then has the recorded digest."""
    digest_file = entry / "digest"
    if not digest_file.exists():
        return False
    skopeo = _tool("skopeo", "skopeo")
    _run([skopeo, "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
          f"oci:{entry / 'layout'}:image", f"docker://{dst_ref}"], timeout=600)
    return manifest_digest(dst_ref) == digest_file.read_text().strip()


def _to_cache(entry: Path, dst_ref: str, digest: str) -> None:
    """Keep the pushed `dst_ref` as an OCI layout (written aside, then renamed into place)."""
    skopeo = _tool("skopeo", "skopeo")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        _run([skopeo, "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
              f"docker://{dst_ref}", f"oci:{tmp / 'layout'}:image"], timeout=600)
        (tmp / "digest").write_text(digest + "\n")
        (tmp / "ref").write_text(dst_ref + "\n")
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(src_ref: str, dst_ref: str, operation: dict[str, Any], cache_dir: Path | None,
            build: Callable[[], None]) -> str:
    """`build()` (which pushes `dst_ref`) unless the cache has the result; then check and keep it."""
    entry = cache_dir / _cache_key(src_ref, operation) if cache_dir is not None else None
    if entry is not None:
        try:
            if _from_cache(entry, dst_ref):
                _check_estargz(dst_ref)
                return dst_ref
        except EstargzError:
            pass  # a broken cache entry is rebuilt below
    build()
    digest = _check_estargz(dst_ref)
    if entry is not None:
        _to_cache(entry, dst_ref, digest)
    return dst_ref


def _pull_source(containerd: Containerd, namespace: str, src_ref: str, dst_ref: str) -> None:
    _ctr(containerd, namespace, "image", "pull", "--plain-http", src_ref, timeout=900)
    # Idempotent: a DST left by an earlier call in this containerd is replaced, not an error.
    containerd.ctr("image", "rm", dst_ref, namespace=namespace, check=False, timeout=60)


# ------------------------------------------------------------------------------------ public


def convert_estargz(containerd: Containerd, namespace: str, src_ref: str, dst_ref: str, *,
                    cache_dir: Path | None = ESTARGZ_CACHE_DIR, timeout: float = 1800) -> str:
    """Convert the plain OCI image `src_ref` into the eStargz image `dst_ref` (unoptimized) and push it.

    Both references name a plain-http registry. Runs ``ctr image pull --plain-http``, ``ctr-remote
    image convert --estargz --oci`` and ``ctr image push --plain-http`` in `namespace` of
    `containerd`; a cached result (see the module docstring) is pushed instead. Returns `dst_ref`.
    """
    def build() -> None:
        _pull_source(containerd, namespace, src_ref, dst_ref)
        _ctr_remote(containerd, namespace, "image", "convert", "--estargz", "--oci", src_ref, dst_ref,
                    timeout=timeout)
        _ctr(containerd, namespace, "image", "push", "--plain-http", dst_ref, timeout=900)

    return _cached(src_ref, dst_ref, {"convert": ["--estargz", "--oci"]}, cache_dir, build)


def optimize_estargz(containerd: Containerd, namespace: str, src_ref: str, dst_ref: str, args: list[str],
                     entrypoint: list[str] | None, *, period: int = 60, net_host: bool = False,
                     probe_url: str | None = None, cache_dir: Path | None = ESTARGZ_CACHE_DIR,
                     timeout: float = 1800) -> str:
    """Convert `src_ref` into an eStargz image optimized for one workload, push it as `dst_ref`.

    ``ctr-remote image optimize --oci`` runs ``entrypoint + args`` once (`entrypoint` ``None``
    keeps the image's own, here none: `args` is then the whole command) with ``--args`` and
    ``--entrypoint`` as JSON, records the files it opens, and converts with those files first
    behind a prefetch landmark. It stops at the workload's exit or after `period` seconds
    (``--period``; bound it for workloads that never exit, such as ``python3 -m http.server``).
    `net_host` runs it in the host's network namespace (``--net-host``; without it the container
    has no network and no CNI is used); `probe_url`, with `net_host`, is requested every 50 ms
    until it answers while the workload runs, so a server's first response is part of the record.
    Then ``ctr image push --plain-http``. Cached like `convert_estargz`. Returns `dst_ref`.
    """
    if probe_url is not None and not net_host:
        raise ValueError("probe_url needs net_host (the container has no network of its own)")
    flags = ["--oci", "--period", str(period), "--args", json.dumps(args)]
    if entrypoint is not None:
        flags += ["--entrypoint", json.dumps(entrypoint)]
    if net_host:
        flags.append("--net-host")

    def build() -> None:
        _pull_source(containerd, namespace, src_ref, dst_ref)
        with _probing(probe_url):
            _ctr_remote(containerd, namespace, "image", "optimize", *flags, src_ref, dst_ref, timeout=timeout)
        _ctr(containerd, namespace, "image", "push", "--plain-http", dst_ref, timeout=900)

    operation = {"optimize": flags, "probe": probe_url is not None}
    return _cached(src_ref, dst_ref, operation, cache_dir, build)


@contextlib.contextmanager
def _probing(url: str | None) -> Iterator[None]:
    """While the block runs, request `url` every 50 ms until it answers once (nothing for ``None``)."""
    if url is None:
        yield
        return
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    resp.read()
                    return
            except (urllib.error.URLError, OSError):
                stop.wait(0.05)

    thread = threading.Thread(target=probe, name="estargz-probe", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
