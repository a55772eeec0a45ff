"""`nydusify optimize`: convert an OCI image into a nydus image laid out for one workload.

The image is unpacked (layers digest-checked and merged with overlay semantics), the workload is
run once on it (`workload.run_traced`), and the regular files it opened, in first-open order,
become the prefetch list of the conversion (`convert.ConvertOptions.prefetch`): the bootstrap's
prefetch table names them and their data goes first in each blob, so a daemon with
``fs_prefetch`` fetches them in a few large requests as soon as the image is mounted. This is what
``ctr-remote image optimize`` does for eStargz; the output is an ordinary nydus image.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from nydus_core.data.rafs.tree import Kind, merge_layers, walk, write_dir
from nydus_core.tools.convert.converter import ConvertOptions, ConvertResult, convert
from nydus_core.tools.convert.image import (
    ConvertError,
    diff_ids_of,
    download_blob,
    fetch_image,
    layer_tree,
    open_client,
    parse_reference,
)
from nydus_core.tools.convert.progress import Progress
from nydus_core.tools.optimize.workload import TraceResult, Workload, WorkloadError, run_traced

log = logging.getLogger("nydusify")


@dataclass
class OptimizeOptions:
    """The workload (`args`/`entrypoint` None: the image config's), how long to watch it, and the
    conversion's own options (its `prefetch` is filled in from the run)."""

    convert: ConvertOptions = field(default_factory=ConvertOptions)
    args: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    cwd: str | None = None
    period: float = 60.0
    net_host: bool = False
    probe_url: str | None = None
    prefetch_out: str | None = None  # also write the recorded list here, one path per line


@dataclass
class OptimizeResult:
    converted: ConvertResult
    prefetch: list[str]
    trace: TraceResult


def _workload(config: dict[str, Any], rootfs: str, opts: OptimizeOptions) -> Workload:
    """The OCI process the image's config (``Entrypoint``, ``Cmd``, ``Env``, ``WorkingDir``,
    ``User``) and the options describe; as containerd builds it, ``--args`` replaces ``Cmd``."""
    cfg = config.get("config") or {}
    entrypoint = opts.entrypoint if opts.entrypoint is not None else list(cfg.get("Entrypoint") or [])
    args = opts.args if opts.args is not None else list(cfg.get("Cmd") or [])
    env = [*(cfg.get("Env") or []), *opts.env]
    uid, gid = _user(str(cfg.get("User") or ""), rootfs)
    return Workload(args=[*entrypoint, *args], env=env, cwd=opts.cwd or str(cfg.get("WorkingDir") or "/"),
                    uid=uid, gid=gid, net_host=opts.net_host, period=opts.period,
                    probe_url=opts.probe_url)  # fmt: skip


def _user(spec: str, rootfs: str) -> tuple[int, int]:
    """``User`` (``name|uid[:group|gid]``) as numbers, names looked up in the image's own files."""
    if not spec:
        return 0, 0
    user, _, group = spec.partition(":")

    def lookup(name: str, table: str, gid_field: bool) -> tuple[int, int]:
        if name.isdigit():
            return int(name), -1
        try:
            with open(os.path.join(rootfs, "etc", table)) as f:
                for line in f:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) > 3 and fields[0] == name:
                        return int(fields[2]), int(fields[3]) if gid_field else -1
        except OSError:
            pass
        raise ConvertError(f"image user {spec!r}: {name!r} is not in the image's /etc/{table}")

    uid, gid = lookup(user, "passwd", True)
    if group:
        gid = lookup(group, "group", False)[0]
    return uid, max(gid, 0)


def unpack(source: str, dest: str, opts: ConvertOptions) -> tuple[dict[str, Any], set[str]]:
    """Unpack image `source` (digest- and diff-id-checked) into the empty directory `dest`;
    returns the image config and the absolute paths of its regular files."""
    ref = parse_reference(source, "source")
    client = open_client(ref, opts.source)
    scratch = tempfile.mkdtemp(prefix="nydusify-unpack-", dir=os.path.dirname(dest) or None)
    try:
        img = fetch_image(client, ref, opts.platform, "source")
        diff_ids = diff_ids_of(img.config, len(img.layers))
        trees = []
        for i, desc in enumerate(img.layers):
            path = os.path.join(scratch, f"layer-{i}")
            pull = Progress(f"[{i + 1}/{len(img.layers)}] pull {str(desc['digest'])[7:19]}",
                            int(desc.get("size", 0)), bar=opts.progress_bar)  # fmt: skip
            download_blob(client, desc, path, pull)
            pull.finish()
            tree, _ = layer_tree(path, diff_ids[i], f"source layer {desc['digest']}")
            os.unlink(path)
            trees.append(tree)  # contents are slices of the layer's .tar, kept until written
        merged = merge_layers(trees)
        write_dir(merged, dest)
        files = {"/" + path.decode("utf-8", "surrogateescape") for path, node in walk(merged)
                 if node.kind is Kind.REG}  # fmt: skip
        return img.config, files
    finally:
        client.close()
        shutil.rmtree(scratch, ignore_errors=True)


def optimize(source: str, target: str, opts: OptimizeOptions | None = None) -> OptimizeResult:
    """Record `opts`' workload on `source` and push `target` laid out for it (module docstring)."""
    opts = opts or OptimizeOptions()
    own_work = opts.convert.work_dir is None
    work = tempfile.mkdtemp(prefix="nydusify-optimize-") if own_work else str(opts.convert.work_dir)
    rootfs = os.path.join(work, "rootfs")
    try:
        shutil.rmtree(rootfs, ignore_errors=True)
        os.makedirs(rootfs)
        config, files = unpack(source, rootfs, opts.convert)
        wl = _workload(config, rootfs, opts)
        log.info("running the workload once to record what it opens: %s", shlex.join(wl.args))
        try:
            trace = run_traced(rootfs, os.path.join(work, "run"), wl, os.path.join(work, "workload.log"))
        except (WorkloadError, OSError) as e:
            raise ConvertError(f"optimize {source}: cannot run the workload: {e}") from e
        if trace.overflowed:
            log.warning("the kernel dropped access events: the prefetch list is incomplete")
        if wl.probe_url and not trace.answered:
            log.warning("%s never answered within %.0f s: the list covers the whole period", wl.probe_url,
                        wl.period)  # fmt: skip
        prefetch = [p for p in trace.paths if p in files]
        end = "exited" if trace.exit_code is not None else ("answered" if trace.answered else "killed")
        log.info(
            "the workload opened %d files of the image in %.1f s (%s)", len(prefetch), trace.seconds, end
        )
        if not prefetch:
            raise ConvertError(f"optimize {source}: the workload opened no file of the image")
        if opts.prefetch_out:
            with open(opts.prefetch_out, "w") as f:
                f.writelines(p + "\n" for p in prefetch)
        shutil.rmtree(rootfs, ignore_errors=True)
        conv = ConvertOptions(**{**opts.convert.__dict__, "prefetch": prefetch,
                                 "work_dir": os.path.join(work, "convert")})  # fmt: skip
        result = convert(source, target, conv)
        return OptimizeResult(result, prefetch, trace)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
