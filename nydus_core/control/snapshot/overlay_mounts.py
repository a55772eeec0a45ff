"""Mount lists byte-compatible with containerd 1.6's overlayfs snapshotter and nydus' mountRemote.

containerd (and the shim) executes these lists verbatim, so the shapes and the option order are
part of the contract:

* no parents: ``bind`` of the upper dir, ``["rw", "rbind"]`` (``"ro"`` for a View);
* Active with parents: ``overlay`` / ``overlay`` with ``index=off`` first when the kernel has the
  overlay ``index`` parameter (containerd 1.6 probes ``/sys/module/overlay/parameters/index``),
  then ``workdir=``, ``upperdir=``, optional ``volatile``, then ``lowerdir=`` nearest first;
* View/Committed with one parent: read-only ``bind`` of the parent's upper dir;
* View with several parents: overlay with ``index=off`` and ``lowerdir=`` only;
* a chain served lazily by a backend (``image_mountpoint``): overlay whose lower dir is the
  image mountpoint: ``volatile``, then ``workdir``/``upperdir`` for Active, then ``lowerdir``
  (for a View the view's own dir follows the mountpoint, as upstream does, so the read-only
  overlay has two lower layers).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import Kind, Mount, MountRequest
from nydus_core.hookspecs import hookimpl

OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@functools.cache
def overlay_index_off() -> bool:
    """True when the overlay module has an ``index`` parameter (so containerd adds index=off).

    Probed once: the module parameter does not come and go while we run.
    """
    return OVERLAY_INDEX_PARAM.exists()


def _volatile(request: MountRequest, config: SnapshotterConfig) -> bool:
    return request.kind == Kind.ACTIVE and (
        L.OVERLAY_VOLATILE in request.labels or config.snapshot.enable_overlayfs_volatile
    )


def native_mounts(request: MountRequest, config: SnapshotterConfig) -> list[Mount]:
    """containerd 1.6 overlayfs ``mounts()``, plus nydus' volatile option for Active snapshots."""
    if not request.lowers:
        flag = "ro" if request.kind == Kind.VIEW else "rw"
        return [Mount(type="bind", source=str(request.upper), options=(flag, "rbind"))]
    options: list[str] = []
    if overlay_index_off():
        options.append("index=off")
    if request.kind == Kind.ACTIVE:
        options += [f"workdir={request.work}", f"upperdir={request.upper}"]
        if _volatile(request, config):
            options.append("volatile")
    elif len(request.lowers) == 1:
        return [Mount(type="bind", source=str(request.lowers[0]), options=("ro", "rbind"))]
    options.append("lowerdir=" + ":".join(str(p) for p in request.lowers))
    return [Mount(type="overlay", source="overlay", options=tuple(options))]


def image_mounts(request: MountRequest, config: SnapshotterConfig) -> list[Mount]:
    """nydus ``mountRemote`` in its default shape (plain overlay over the image mountpoint)."""
    assert request.image_mountpoint is not None
    options: list[str] = []
    if _volatile(request, config):
        options.append("volatile")
    if request.kind == Kind.ACTIVE:
        options += [f"workdir={request.work}", f"upperdir={request.upper}"]
    lowers: list[str] = []
    cm = config.experimental
    covers = request.image.covers if request.image is not None else None
    if covers is not None:
        # The image replaces only the parents it covers (an eStargz run between plain layers).
        placed = False
        for lower in request.lowers:
            if lower.parent.name not in covers:
                lowers.append(str(lower))
            elif not placed:
                lowers.append(str(request.image_mountpoint))
                placed = True
        if not placed:
            lowers.append(str(request.image_mountpoint))
    elif (cm.enable_referrer_detect or cm.enable_index_detect) and request.image is not None:
        # Parent layers above the meta snapshot are not part of the bootstrap: keep them on top.
        meta = request.image.meta_id
        for lower in request.lowers:
            if lower.parent.name == meta:
                break
            lowers.append(str(lower))
        lowers.append(str(request.image_mountpoint))
    else:
        lowers.append(str(request.image_mountpoint))
    if request.kind == Kind.VIEW:
        lowers.append(str(request.upper))
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount(type="overlay", source="overlay", options=tuple(options))]


def native_or_image_mounts(request: MountRequest, config: SnapshotterConfig) -> list[Mount]:
    """The default mount producer: image mounts when a backend serves the chain, else native."""
    if request.image_mountpoint is not None:
        return image_mounts(request, config)
    return native_mounts(request, config)


def relative_overlay_options(options: list[str] | tuple[str, ...]) -> tuple[str, list[str]]:
    """Rewrite the ``lowerdir=`` list relative to its dirs' longest common parent.

    containerd's mounter does this when the option string would not fit in a page (the kernel's
    limit for mount data): it mounts from a child that chdirs to that parent, passing relative
    lower dirs (upperdir/workdir stay absolute). Returns the directory to chdir to and the
    rewritten options; ``"/"`` and the options unchanged when there is no lowerdir.
    """
    lowers: list[str] = []
    for opt in options:
        if opt.startswith("lowerdir="):
            lowers = opt[len("lowerdir=") :].split(":")
    if not lowers:
        return "/", list(options)
    common = os.path.commonpath(lowers)
    if common in lowers:  # one dir (or all the same): chdir to its parent
        common = os.path.dirname(common)
    out = []
    for opt in options:
        if opt.startswith("lowerdir="):
            opt = "lowerdir=" + ":".join(os.path.relpath(p, common) for p in lowers)
        out.append(opt)
    return common, out


@hookimpl(trylast=True)
def nydus_mounts(request: MountRequest, config: SnapshotterConfig) -> list[Mount] | None:
    """The built-in mount producer: asked last, so any plugin's producer wins over it."""
    return native_or_image_mounts(request, config)
