"""Image references and the per-image nydusd JSON config."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from nydus_core import labels as L
from nydus_core.control.daemons.image_config import (
    DEFAULT_TEMPLATE,
    build_config,
    load_template,
    write_private_json,
)
from nydus_core.data.remote.reference import ImageRef, parse_ref
from nydus_core.errors import ConfigError, InvalidArgument
from nydus_core.plugins import build_plugin_manager


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("busybox", ImageRef("docker.io", "library/busybox", "latest")),
        ("docker.io/library/busybox:1.36", ImageRef("docker.io", "library/busybox", "1.36")),
        ("index.docker.io/foo/bar", ImageRef("docker.io", "foo/bar", "latest")),
        ("user/app:v1", ImageRef("docker.io", "user/app", "v1")),
        ("localhost:5000/team/app", ImageRef("localhost:5000", "team/app", "latest")),
        ("localhost/app:2", ImageRef("localhost", "app", "2")),
        ("ghcr.io/o/r@sha256:" + "a" * 64, ImageRef("ghcr.io", "o/r", "", "sha256:" + "a" * 64)),
        ("127.0.0.1:39017/ny/bb:v-nydus", ImageRef("127.0.0.1:39017", "ny/bb", "v-nydus")),
    ],
)  # fmt: skip
def test_parse_ref(ref: str, want: ImageRef) -> None:
    assert parse_ref(ref) == want


def test_parse_ref_api_host_and_errors() -> None:
    assert parse_ref("busybox").api_host == "index.docker.io"
    assert parse_ref("quay.io/a/b").api_host == "quay.io"
    for bad in ("", " busybox", "a b", "quay.io/", "quay.io//x"):
        with pytest.raises(InvalidArgument):
            parse_ref(bad)


def test_load_template(tmp_path: Path) -> None:
    assert load_template(tmp_path / "missing.json") == DEFAULT_TEMPLATE
    assert load_template(tmp_path / "missing.json") is not DEFAULT_TEMPLATE
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_template(bad)
    bad.write_text("[1]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_template(bad)


def test_build_config_does_not_touch_template_and_non_registry_backends(tmp_path: Path) -> None:
    pm = build_plugin_manager(entry_points=False, env={})
    labels = {L.PULL_USERNAME: "u", L.PULL_SECRET: "p:with:colons"}
    doc = build_config(DEFAULT_TEMPLATE, image_ref="busybox", rafs_key="9", cache_dir=tmp_path,
                       labels=labels, hooks=pm.typed)  # fmt: skip
    cfg = doc["device"]["backend"]["config"]
    assert base64.b64decode(cfg["auth"]) == b"u:p:with:colons"
    assert "host" not in DEFAULT_TEMPLATE["device"]["backend"]["config"]
    localfs = {"device": {"backend": {"type": "localfs", "config": {"dir": "/blobs"}}}}
    doc = build_config(localfs, image_ref="busybox", rafs_key="9", cache_dir=tmp_path, labels=labels,
                       hooks=pm.typed)  # fmt: skip
    assert doc["device"]["backend"]["config"] == {"dir": "/blobs"}
    assert doc["device"]["id"] == "/9"
    with pytest.raises(ConfigError, match=r"device\.backend must be a JSON object"):
        build_config({"device": {"backend": 3}}, image_ref="busybox", rafs_key="9", cache_dir=tmp_path,
                     labels={}, hooks=pm.typed)  # fmt: skip


def test_write_private_json(tmp_path: Path) -> None:
    target = tmp_path / "d" / "config.json"
    write_private_json(target, {"a": 1})
    write_private_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]  # no temp files left
