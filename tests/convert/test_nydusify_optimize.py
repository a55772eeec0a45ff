"""`nydusify optimize` and `convert --prefetch-patterns` against a real registry, runc and fanotify.

The workload runs once in a real container on the unpacked busybox image; the files it opens
must become the bootstrap's prefetch table and go first in their layer's blob.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from convert_helpers import NYDUSIFY, assert_ok, get_manifest, run_nydusify

from nydus_core.data.rafs.bootstrap import Bootstrap
from nydus_core.data.remote.errors import RegistryError
from nydus_core.testing.services import BUSYBOX_LAYER2_FILE, BUSYBOX_LAYER3_FILE

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None,
                                reason="needs root and runc (a real container run)")  # fmt: skip


def _bootstrap(ref: str) -> Bootstrap:
    manifest, _, client = get_manifest(ref)
    tar = gzip.decompress(client.read_blob(manifest["layers"][-1]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = tf.extractfile("image/image.boot")
        assert member is not None
        return Bootstrap(member.read())


def _offset(bs: Bootstrap, path: str) -> tuple[int, int]:
    """(blob index, stored offset) of the file's first chunk."""
    ref = bs.file_chunks(bs.erofs.lookup(path.strip("/")))[0]
    return ref.blob_index, bs.chunk_info(ref, path).compressed_offset


def test_optimize_records_the_workload_and_lays_its_files_out_first(
    busybox_image: str, tmp_path: Path
) -> None:
    target = busybox_image.rsplit(":", 1)[0] + ":optimized"
    listing = tmp_path / "prefetch.txt"
    cmd = ["/bin/sh", "-c", f"cat /data/random.bin >/dev/null; cat {BUSYBOX_LAYER3_FILE}"]
    proc = run_nydusify("optimize", "--plain-http", "--source", busybox_image, "--target", target,
                        "--args", json.dumps(cmd), "--period", "30",
                        "--prefetch-out", str(listing))  # fmt: skip
    assert_ok(proc, "optimize")
    assert "3 files prefetched" in proc.stdout
    recorded = listing.read_text().splitlines()
    assert recorded == ["/bin/busybox", "/data/random.bin", BUSYBOX_LAYER3_FILE]  # first open first

    bs = _bootstrap(target)
    assert bs.prefetch == [bs.erofs.lookup(p.strip("/")).nid for p in recorded]
    # random.bin sorts after layer2.txt by path, but was opened: its data comes first in the blob
    (blob, opened), (same_blob, unopened) = _offset(bs, "/data/random.bin"), _offset(bs, BUSYBOX_LAYER2_FILE)
    assert blob == same_blob and opened < unopened
    # the image is still the source's filesystem, byte for byte
    assert_ok(run_nydusify("check", "--plain-http", "--source", busybox_image, "--target", target), "check")


def test_convert_prefetch_patterns_from_stdin(busybox_image: str) -> None:
    target = busybox_image.rsplit(":", 1)[0] + ":patterns"
    proc = subprocess.run([NYDUSIFY, "convert", "--plain-http", "--source", busybox_image, "--target", target,
                           "--prefetch-patterns"], input=f"{BUSYBOX_LAYER2_FILE}\n/not/there\n/etc\n",
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert_ok(proc, "convert --prefetch-patterns")
    bs = _bootstrap(target)
    assert bs.prefetch == [bs.erofs.lookup(BUSYBOX_LAYER2_FILE.strip("/")).nid, bs.erofs.lookup("etc").nid]
    assert "2 of 3 listed paths are in the image" in proc.stderr


def test_optimize_errors_are_one_clear_line(busybox_image: str) -> None:
    target = busybox_image.rsplit(":", 1)[0] + ":never"
    proc = run_nydusify("optimize", "--plain-http", "--source", busybox_image, "--target", target,
                        "--args", '["/no/such/program"]', "--period", "10")  # fmt: skip
    assert proc.returncode == 1
    assert "opened no file of the image" in proc.stderr
    bad = run_nydusify("optimize", "--plain-http", "--source", busybox_image, "--target", target,
                       "--args", "not json")  # fmt: skip
    assert bad.returncode == 2 and "not JSON" in bad.stderr
    with pytest.raises(RegistryError):  # nothing was pushed
        get_manifest(target)
