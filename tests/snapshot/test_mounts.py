"""Mount shapes (byte for byte containerd 1.6 overlayfs) and that the kernel really mounts them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Served
from snap_helpers import commit, mounts, prepare, remove, shape, update, view

from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.overlay_mounts import (
    OVERLAY_INDEX_PARAM,
    overlay_index_off,
    relative_overlay_options,
)

INDEX = ["index=off"] if OVERLAY_INDEX_PARAM.exists() else []


def test_index_param_probe_matches_kernel() -> None:
    # containerd 1.6 adds index=off exactly when this module parameter exists (it does here).
    assert overlay_index_off() == OVERLAY_INDEX_PARAM.exists()
    assert OVERLAY_INDEX_PARAM.exists(), "this kernel is expected to have the overlay index parameter"


def _chain(served: Served, n: int) -> str:
    parent = ""
    for i in range(1, n + 1):
        prepare(served.stub, f"x{i}", parent)
        commit(served.stub, f"l{i}", f"x{i}")
        parent = f"l{i}"
    return parent


def test_native_shapes(served: Served) -> None:
    stub, s = served.stub, served.root / "snapshots"
    assert shape(prepare(stub, "a")) == [("bind", f"{s}/1/fs", ["rw", "rbind"])]
    assert shape(view(stub, "v0")) == [("bind", f"{s}/2/fs", ["ro", "rbind"])]
    commit(stub, "l1", "a")
    active1 = prepare(stub, "act1", "l1")
    assert shape(active1) == [
        ("overlay", "overlay", [*INDEX, f"workdir={s}/3/work", f"upperdir={s}/3/fs", f"lowerdir={s}/1/fs"])
    ]
    assert shape(view(stub, "v1", "l1")) == [("bind", f"{s}/1/fs", ["ro", "rbind"])]
    prepare(stub, "b", "l1")
    commit(stub, "l2", "b")  # id 5
    assert shape(view(stub, "v2", "l2")) == [
        ("overlay", "overlay", [*INDEX, f"lowerdir={s}/5/fs:{s}/1/fs"])
    ]
    assert shape(prepare(stub, "act2", "l2")) == [
        ("overlay", "overlay",
         [*INDEX, f"workdir={s}/7/work", f"upperdir={s}/7/fs", f"lowerdir={s}/5/fs:{s}/1/fs"])
    ]
    # Mounts returns the same as Prepare/View did
    assert shape(mounts(stub, "act1")) == shape(active1)
    assert shape(mounts(stub, "v2")) == [("overlay", "overlay", [*INDEX, f"lowerdir={s}/5/fs:{s}/1/fs"])]
    assert shape(mounts(stub, "v0")) == [("bind", f"{s}/2/fs", ["ro", "rbind"])]
    assert all(m.target == "" for m in active1)


def test_volatile_label_and_config(served: Served, start_snapshotter: Any, short_tmp: Path) -> None:
    stub, s = served.stub, served.root / "snapshots"
    _chain(served, 1)
    vol = {"containerd.io/snapshot/overlay.volatile": "true"}
    m = prepare(stub, "v", "l1", **vol)
    assert shape(m) == [
        ("overlay", "overlay",
         [*INDEX, f"workdir={s}/2/work", f"upperdir={s}/2/fs", "volatile", f"lowerdir={s}/1/fs"])
    ]
    # no volatile for a read-only view, and none without parents (bind)
    assert "volatile" not in shape(view(stub, "vv", "l1", **vol))[0][2]
    assert shape(prepare(stub, "np", "", **vol))[0][2] == ["rw", "rbind"]

    root = short_tmp / "vol"
    cfg = SnapshotterConfig(root=root)
    cfg.snapshot.enable_overlayfs_volatile = True
    other = start_snapshotter(config=cfg, root=root)
    prepare(other.stub, "a")
    commit(other.stub, "l", "a")
    assert "volatile" in shape(prepare(other.stub, "c", "l"))[0][2]


def test_relative_lowerdir_rewrite() -> None:
    common, opts = relative_overlay_options(
        ["index=off", "workdir=/r/s/9/work", "lowerdir=/r/s/2/fs:/r/s/1/fs"]
    )
    assert common == "/r/s"
    assert opts == ["index=off", "workdir=/r/s/9/work", "lowerdir=2/fs:1/fs"]
    assert relative_overlay_options(["lowerdir=/a/b/fs"]) == ("/a/b", ["lowerdir=fs"])


# ------------------------------------------------------------------------------- real mounts

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

_MOUNT_CHILD = r"""
import ctypes, os, sys
fstype, source, target, data = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
flags = 0
opts = []
MS_RDONLY, MS_BIND, MS_REC = 1, 4096, 16384
for o in data.split(","):
    if fstype == "bind" and o in ("ro", "rw", "rbind", "bind"):
        flags |= {"ro": MS_RDONLY, "rw": 0, "rbind": MS_BIND | MS_REC, "bind": MS_BIND}[o]
    elif o:
        opts.append(o)
if fstype == "bind":
    if libc.mount(source.encode(), target.encode(), None, flags & ~MS_RDONLY, None) != 0:
        sys.exit("mount: " + os.strerror(ctypes.get_errno()))
    if flags & MS_RDONLY and libc.mount(b"", target.encode(), None, 32 | MS_BIND | MS_RDONLY, None) != 0:
        sys.exit("remount ro: " + os.strerror(ctypes.get_errno()))
else:
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, ",".join(opts).encode()) != 0:
        sys.exit("mount: " + os.strerror(ctypes.get_errno()))
"""


def kernel_mount(m: Any, target: Path) -> None:
    """mount(2) a returned Mount like containerd: relative lowerdirs from a chdir'd child if long."""
    options = list(m.options)
    cwd = "/"
    if len(",".join(options)) >= os.sysconf("SC_PAGE_SIZE") - 1:
        cwd, options = relative_overlay_options(options)
    subprocess.run([sys.executable, "-c", _MOUNT_CHILD, m.type, m.source, str(target), ",".join(options)],
                   cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def mountpoint() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nc-mnt-"))
    yield d
    while subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
        pass
    os.rmdir(d)


@needs_root
def test_three_layer_overlay_really_mounts_with_copy_up(served: Served, mountpoint: Path) -> None:
    stub, s = served.stub, served.root / "snapshots"
    parent = ""
    for i in range(1, 4):
        [m] = prepare(stub, f"x{i}", parent)
        upper = Path(m.source) if m.type == "bind" else Path(m.options[-2].split("=", 1)[1])
        (upper / f"layer{i}").write_text(f"from {i}\n")
        (upper / "shared").write_text(f"shared {i}\n")
        commit(stub, f"l{i}", f"x{i}")
        parent = f"l{i}"
    [m] = prepare(stub, "ctr", "l3")
    kernel_mount(m, mountpoint)
    assert sorted(os.listdir(mountpoint)) == ["layer1", "layer2", "layer3", "shared"]
    assert (mountpoint / "shared").read_text() == "shared 3\n"  # nearest layer wins
    (mountpoint / "layer1").write_text("changed\n")
    (mountpoint / "new").write_text("new\n")
    upper = s / "4" / "fs"
    assert (upper / "layer1").read_text() == "changed\n"  # copied up into the upperdir
    assert (upper / "new").read_text() == "new\n"
    assert (s / "1" / "fs" / "layer1").read_text() == "from 1\n"  # lower untouched


@needs_root
def test_views_mount_read_only(served: Served, mountpoint: Path) -> None:
    _chain(served, 2)
    (served.root / "snapshots" / "1" / "fs" / "f1").write_text("1")
    (served.root / "snapshots" / "2" / "fs" / "f2").write_text("2")
    [m] = view(served.stub, "v", "l2")
    assert m.type == "overlay"
    kernel_mount(m, mountpoint)
    assert sorted(os.listdir(mountpoint)) == ["f1", "f2"]
    with pytest.raises(OSError):
        (mountpoint / "x").write_text("no")
    subprocess.run(["umount", str(mountpoint)], check=True)
    [m] = view(served.stub, "v1", "l1")
    assert m.type == "bind"
    kernel_mount(m, mountpoint)
    assert os.listdir(mountpoint) == ["f1"]
    with pytest.raises(OSError):
        (mountpoint / "x").write_text("no")


@needs_root
def test_128_layer_chain_mounts_with_relative_lowerdirs(served: Served, mountpoint: Path) -> None:
    stub, s = served.stub, served.root / "snapshots"
    parent = ""
    for i in range(1, 129):
        prepare(stub, f"x{i}", parent)
        commit(stub, f"l{i}", f"x{i}")
        parent = f"l{i}"
    # ids 1..128 are the layers (no other snapshot was created meanwhile)
    for i in range(1, 129):
        (s / str(i) / "fs" / f"file{i:03d}").write_text(str(i))
    [m] = prepare(stub, "ctr", "l128")
    lowerdir = m.options[-1]
    assert lowerdir.startswith("lowerdir=") and lowerdir.count(":") == 127
    assert len(",".join(m.options)) > os.sysconf("SC_PAGE_SIZE")  # too long for one mount(2) page
    kernel_mount(m, mountpoint)
    names = sorted(os.listdir(mountpoint))
    assert names == [f"file{i:03d}" for i in range(1, 129)]
    assert (mountpoint / "file001").read_text() == "1"
    assert (mountpoint / "file128").read_text() == "128"


def test_mounts_cache_follows_update_remove_and_commit(served: Served) -> None:
    """Mounts answers from memory after the first call; every change of what the mounts depend
    on (own labels, the key's record, a parent's labels) must be visible in the next answer."""
    stub, s = served.stub, served.root / "snapshots"
    _chain(served, 1)  # l1 = id 1
    vol = "containerd.io/snapshot/overlay.volatile"
    prepare(stub, "k", "l1")  # id 2
    plain = [*INDEX, f"workdir={s}/2/work", f"upperdir={s}/2/fs", f"lowerdir={s}/1/fs"]
    assert shape(mounts(stub, "k"))[0][2] == plain
    assert shape(mounts(stub, "k"))[0][2] == plain  # served from the cache
    update(stub, "k", {vol: "true"}, ["labels." + vol])
    assert "volatile" in shape(mounts(stub, "k"))[0][2]
    update(stub, "k", {}, ["labels." + vol])
    assert shape(mounts(stub, "k"))[0][2] == plain

    # Same key again after Remove: new id, new parent
    remove(stub, "k")
    prepare(stub, "k", "")  # id 3
    assert shape(mounts(stub, "k")) == [("bind", f"{s}/3/fs", ["rw", "rbind"])]

    # After Commit the key is no longer active: Mounts must fail, not answer from memory
    commit(stub, "c", "k")
    with pytest.raises(grpc.RpcError) as err:
        mounts(stub, "k")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # A parent's label decides whether an image serves the chain: the cache must not hide it
    view(stub, "w", "l1")
    assert shape(mounts(stub, "w")) == [("bind", f"{s}/1/fs", ["ro", "rbind"])]
    update(stub, "l1", {"containerd.io/snapshot/nydus-bootstrap": "true"}, ["labels"])
    with pytest.raises(grpc.RpcError) as err:
        mounts(stub, "w")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
