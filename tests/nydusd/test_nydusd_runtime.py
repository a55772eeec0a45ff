"""The backend-neutral daemon: config parsing, RAFS instances, and the HTTP API over a real socket.

The API is exercised with the snapshotter's own client (`NydusdClient`), so both sides of the
upstream contract are checked against each other.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus_core.control.daemons.client import NydusdApiError, NydusdClient
from nydus_core.data.runtime.api import ApiServer
from nydus_core.data.runtime.instance import RafsInstance
from nydus_core.data.runtime.nydusd_json import ConfigInvalid, NydusdConfig
from nydus_core.data.runtime.state import STATE_RUNNING, DaemonRuntime
from nydus_core.testing.images import FIXTURES, Image, build_image, localfs_config


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return build_image(
        tmp_path / "img",
        {"etc/motd": b"hello\n", "bin/big": os.urandom(3 << 20), "a/b/c.txt": b"deep"},
        symlinks={"etc/link": "motd"},
        xattrs={"etc/motd": {"user.colour": "blue"}},
    )


@pytest.fixture
def sock() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="nyd-api-", dir="/tmp")  # short: unix socket path limit
    yield Path(d) / "api.sock"
    for p in Path(d).iterdir():
        p.unlink()
    os.rmdir(d)


def test_config_parsing_and_errors(tmp_path: Path) -> None:
    doc = localfs_config(tmp_path, tmp_path / "c", digest_validate=True,
                         fs_prefetch={"enable": True, "threads_count": 3})  # fmt: skip
    cfg = NydusdConfig.from_json(json.dumps(doc))
    assert cfg.backend_type == "localfs" and cfg.backend_config["dir"] == str(tmp_path)
    assert cfg.work_dir == str(tmp_path / "c") and cfg.digest_validate
    assert cfg.prefetch.enable and cfg.prefetch.threads_count == 3
    with pytest.raises(ConfigInvalid, match="not valid JSON"):
        NydusdConfig.from_json("{")
    with pytest.raises(ConfigInvalid, match=r"device\.backend\.type 'oss'"):
        NydusdConfig.from_dict({"device": {"backend": {"type": "oss"}}})
    with pytest.raises(ConfigInvalid, match="work_dir"):
        NydusdConfig.from_dict({"device": {"backend": {"type": "localfs", "config": {"dir": "/x"}}}})
    with pytest.raises(ConfigInvalid, match=r"device\.backend must be a JSON object"):
        NydusdConfig.from_dict({"device": {"backend": []}})
    ok = localfs_config(tmp_path, tmp_path / "c")
    assert NydusdConfig.from_dict(ok).amplify_across_files == 256 << 10
    assert NydusdConfig.from_dict({**ok, "amplify_across_files": 65536}).amplify_across_files == 65536
    for bad in (-1, "64k", True):
        with pytest.raises(ConfigInvalid, match="amplify_across_files"):
            NydusdConfig.from_dict({**ok, "amplify_across_files": bad})


def test_instance_inode_operations(image: Image, tmp_path: Path) -> None:
    cfg = NydusdConfig.from_dict(localfs_config(image.blob_dir, tmp_path / "cache"))
    inst = RafsInstance(str(image.bootstrap), cfg)
    try:
        root = inst.root_nid
        assert [n for n, _ in inst.readdir(root)] == [b"a", b"bin", b"etc"]
        etc = inst.lookup(root, b"etc")
        motd = inst.lookup(etc, b"motd")
        assert inst.inode(motd).size == 6
        assert inst.read(motd, 0, 100) == b"hello\n"
        assert inst.read(motd, 6, 10) == b""
        assert inst.readlink(inst.lookup(etc, b"link")) == b"motd"
        assert inst.xattrs(motd) == {b"user.colour": b"blue"}
        with pytest.raises(FileNotFoundError):
            inst.lookup(etc, b"nope")
        with pytest.raises(NotADirectoryError):
            inst.lookup(motd, b"x")
        big = inst.lookup_path("bin/big")
        want = image.files["bin/big"]
        assert inst.read_if_cached(big, 0, 4096) is None  # nothing fetched yet
        assert inst.read_cached_into(big, 0, 4096, bytearray(4096)) is None
        # a read across a chunk boundary touches exactly the two chunks
        off = (1 << 20) - 10
        assert inst.read(big, off, 20) == want[off : off + 20]
        assert inst.read_if_cached(big, off, 20) == want[off : off + 20]
        assert inst.read(big, 0, len(want) + 5) == want
        # the allocation-free path the FUSE backend uses for cached data
        buf = bytearray(1 << 20)
        view = inst.read_cached_into(big, off, 1 << 20, buf)
        assert view is not None and bytes(view) == want[off : off + (1 << 20)]
        tail = inst.read_cached_into(big, len(want) - 3, 100, buf)
        assert tail is not None and bytes(tail) == want[-3:]
        with pytest.raises(ValueError):
            inst.read_cached_into(big, 0, 2 << 20, buf)
        # nids are the bootstrap's: a second instance of the same image agrees
        other = RafsInstance(str(image.bootstrap), cfg)
        assert other.lookup_path("bin/big") == big
        other.close()
    finally:
        inst.close()


def test_prefetch_warms_listed_files(image: Image, tmp_path: Path) -> None:
    doc = localfs_config(image.blob_dir, tmp_path / "cache", fs_prefetch={"enable": True, "threads_count": 2})
    cfg = NydusdConfig.from_dict(doc)
    inst = RafsInstance(str(image.bootstrap), cfg, prefetch_files=["/bin", "/no/such"])
    try:
        inst.start_prefetch()
        inst.wait_prefetch(10)
        big = inst.lookup_path("bin/big")
        assert inst.read_if_cached(big, 0, 3 << 20) == image.files["bin/big"]
        m = inst.blobcache_metrics("/x")
        assert m["prefetch_data_amount"] >= 3 << 20 and m["prefetch_requests_count"] == 1
    finally:
        inst.close()


def test_prefetch_follows_the_bootstrap_prefetch_table(tmp_path: Path) -> None:
    files = {"hot/a.bin": os.urandom(300_000), "cold/b.bin": os.urandom(300_000)}
    img = build_image(tmp_path / "img", files, chunk_size=64 * 1024, prefetch=["/hot"])
    doc = localfs_config(img.blob_dir, tmp_path / "cache", fs_prefetch={"enable": True})
    inst = RafsInstance(str(img.bootstrap), NydusdConfig.from_dict(doc))
    try:
        assert inst.bootstrap.prefetch  # the writer recorded /hot
        inst.start_prefetch()
        inst.wait_prefetch(10)
        hot, cold = inst.lookup_path("hot/a.bin"), inst.lookup_path("cold/b.bin")
        assert inst.read_if_cached(hot, 0, 300_000) == files["hot/a.bin"]
        assert inst.read_if_cached(cold, 0, 4096) is None
    finally:
        inst.close()


def test_prefetch_of_a_laid_out_list_takes_few_large_requests(tmp_path: Path) -> None:
    """Every other file of a directory is prefetched. Built with that list (laid out first) the
    prefetch is a few merging_size requests; the same list on an image laid out by path, where
    the unlisted files sit between the listed ones, costs a request per file."""
    files = {f"d/f{i:02d}": os.urandom(20_000) for i in range(40)}
    hot = [f"/d/f{i:02d}" for i in range(0, 40, 2)]
    merging = 256 << 10
    requests = {}
    for name, build_list, runtime_list in (("laid-out", hot, []), ("by-path", [], hot)):
        img = build_image(tmp_path / name, files, chunk_size=64 * 1024, prefetch=build_list)
        prefetch = {"enable": True, "threads_count": 4, "merging_size": merging}
        doc = localfs_config(img.blob_dir, tmp_path / f"cache-{name}", amplify_io=0, fs_prefetch=prefetch)
        inst = RafsInstance(str(img.bootstrap), NydusdConfig.from_dict(doc), prefetch_files=runtime_list)
        try:
            inst.start_prefetch()
            inst.wait_prefetch(10)
            for path in hot:
                assert inst.read_if_cached(inst.lookup_path(path[1:]), 0, 20_000) == files[path[1:]]
            assert inst.read_if_cached(inst.lookup_path("d/f01"), 0, 4096) is None
            requests[name] = inst.cache_stats.backend_reads
        finally:
            inst.close()
    assert requests["laid-out"] <= -(-20 * 20_000 // merging) + 1  # 400 kB in 256 KiB windows
    assert requests["by-path"] == 20


def test_api_like_upstream(image: Image, tmp_path: Path, sock: Path) -> None:
    rt = DaemonRuntime("d1", shared=True)
    server = ApiServer(str(sock), rt)
    server.start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        with NydusdClient(sock, timeout=5) as c:
            info = c.daemon_info()
            assert (info.id, info.state) == ("d1", "INIT")
            assert set(info.version) == {"package_ver", "git_commit", "build_time", "profile", "rustc"}
            rt.state = STATE_RUNNING
            assert c.state() == "RUNNING"
            config = json.dumps(localfs_config(image.blob_dir, tmp_path / "cache"))
            c.mount("snap1", image.bootstrap, config)
            with pytest.raises(NydusdApiError) as dup:
                c.mount("snap1", image.bootstrap, config)
            assert dup.value.status == 409 and dup.value.code == "EEXIST"
            with pytest.raises(NydusdApiError) as bad:
                c.mount("snap2", image.bootstrap, "{not json")
            assert bad.value.status == 400 and "JSON" in bad.value.message
            with pytest.raises(NydusdApiError) as missing:
                c.mount("snap3", tmp_path / "nope.boot", config)
            assert missing.value.status == 404
            inst = rt.get("snap1")
            assert inst is not None
            inst.read(inst.lookup_path("etc/motd"), 0, 10)
            cache = c.blobcache_metrics("snap1")
            assert cache["underlying_files"] == [str(tmp_path / "cache" / f"{image.blob_id}.blob.data")]
            assert cache["total"] >= 1
            assert c.blobcache_metrics()["underlying_files"] == cache["underlying_files"]
            fs = c.metrics("snap1")
            assert fs["data_read"] == 6
            backend = c._json("GET", "/api/v1/metrics/backend")
            assert backend["read_count"] >= 1 and backend["backend_type"] == "localfs"
            with pytest.raises(NydusdApiError) as nosid:
                c.metrics("other")
            assert nosid.value.status == 404 and nosid.value.code == "ENOENT"
            c.umount("snap1")
            with pytest.raises(NydusdApiError) as gone:
                c.umount("snap1")
            assert gone.value.status == 404
            with pytest.raises(NydusdApiError) as unknown:
                c._json("GET", "/api/v1/nope")
            assert unknown.value.status == 404 and unknown.value.code
    finally:
        server.stop()
        rt.close()
    assert not sock.exists()


def test_api_survives_garbage_requests(sock: Path) -> None:
    rt = DaemonRuntime("", shared=True)
    server = ApiServer(str(sock), rt)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"NONSENSE\r\n\r\n")
            s.recv(1024)
        with NydusdClient(sock, timeout=5) as c:
            assert c.state() == "INIT"
    finally:
        server.stop()


@pytest.mark.skipif(not (FIXTURES / "bootstrap" / "rafs-v6-2.2.boot").exists(), reason="no fixtures")
def test_upstream_fixture_instance(tmp_path: Path) -> None:
    cfg = NydusdConfig.from_dict(localfs_config(FIXTURES / "blobs", tmp_path / "cache"))
    inst = RafsInstance(str(FIXTURES / "bootstrap" / "rafs-v6-2.2.boot"), cfg)
    try:
        lib = inst.lookup_path("lib.rs")
        data = inst.read(lib, 0, 1 << 20)
        assert len(data) == 16931 and data.startswith(b"// Copyright (C) 2020 Alibaba Cloud.")
        assert len(inst.read(inst.lookup_path("sync_io.rs"), 0, 1 << 20)) == 13400
    finally:
        inst.close()
