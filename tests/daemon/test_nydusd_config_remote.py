"""``[remote]`` settings carried into the per-image nydusd JSON config (TLS skip, hosts.toml mirrors).

The end-to-end behaviour (a daemon reading through these mirrors, with a CA from hosts.toml) is in
`tests/e2e_remote`; here is what the snapshotter writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nydus_core.config import MirrorsConfig, RemoteConfig
from nydus_core.control.daemons.image_config import DEFAULT_TEMPLATE, build_config
from nydus_core.data.remote.mirrors import from_hosts_dir, from_nydusd_json
from nydus_core.errors import ConfigError
from nydus_core.plugins import build_plugin_manager

REF = "reg.example.com:5000/team/app:v1"


def _build(
    tmp_path: Path, remote: RemoteConfig | None, template: dict[str, Any] | None = None
) -> dict[str, Any]:
    pm = build_plugin_manager(entry_points=False, env={})
    doc = build_config(template or DEFAULT_TEMPLATE, image_ref=REF, rafs_key="7",
                       cache_dir=tmp_path / "cache", labels={}, hooks=pm.typed, remote=remote)  # fmt: skip
    cfg: dict[str, Any] = doc["device"]["backend"]["config"]
    return cfg


def _hosts(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "certs.d"
    (d / "reg.example.com_5000_").mkdir(parents=True)
    (d / "reg.example.com_5000_" / "hosts.toml").write_text(text)
    return d


def test_skip_ssl_verify(tmp_path: Path) -> None:
    assert _build(tmp_path, RemoteConfig(skip_ssl_verify=True))["skip_verify"] is True
    assert _build(tmp_path, RemoteConfig())["skip_verify"] is False
    assert "mirrors" not in _build(tmp_path, RemoteConfig())


def test_hosts_toml_mirrors_are_passed_through_after_the_templates(tmp_path: Path) -> None:
    d = _hosts(tmp_path, '''
server = "https://reg.example.com:5000"
[host."https://m1.example.com"]
  ca = "m1.pem"
  header = { X-A = "1" }
  failure_limit = 2
  ping_url = "https://m1.example.com/ping"
[host."http://resolve-only.example.com"]
  capabilities = ["resolve"]
[host."http://m2.example.com:81/base"]
  skip_verify = true
  override_path = true
''')
    template: dict[str, Any] = {"device": {"backend": {"type": "registry", "config": {
        "mirrors": [{"host": "http://p2p.local:65001", "auth_through": False}]}}}}  # fmt: skip
    cfg = _build(tmp_path, RemoteConfig(mirrors_config=MirrorsConfig(dir=d)), template)
    hosts = [m["host"] for m in cfg["mirrors"]]
    assert hosts == ["http://p2p.local:65001", "https://m1.example.com", "http://m2.example.com:81/base"]
    assert cfg["mirrors"][1]["ca_cert_files"] == [str(d / "reg.example.com_5000_" / "m1.pem")]
    # What the daemon reads back is what the snapshotter read from hosts.toml (minus resolve-only).
    pulling = [m for m in from_hosts_dir(d, "reg.example.com:5000") if "pull" in m.capabilities]
    assert from_nydusd_json(cfg["mirrors"][1:]) == pulling
    assert template["device"]["backend"]["config"]["mirrors"] == [{"host": "http://p2p.local:65001",
                                                                   "auth_through": False}]  # fmt: skip


def test_no_hosts_toml_for_this_registry_adds_nothing(tmp_path: Path) -> None:
    d = tmp_path / "certs.d"
    (d / "other.example.com").mkdir(parents=True)
    (d / "other.example.com" / "hosts.toml").write_text('[host."http://m"]\n')
    assert "mirrors" not in _build(tmp_path, RemoteConfig(mirrors_config=MirrorsConfig(dir=d)))


def test_malformed_hosts_toml_is_a_config_error(tmp_path: Path) -> None:
    d = _hosts(tmp_path, "[host\n")
    with pytest.raises(ConfigError, match=r"\[remote.mirrors_config\] dir: .*hosts\.toml"):
        _build(tmp_path, RemoteConfig(mirrors_config=MirrorsConfig(dir=d)))
    good = _hosts(tmp_path / "g", '[host."http://m"]\n')
    with pytest.raises(ConfigError, match="mirrors must be a JSON array"):
        _build(tmp_path, RemoteConfig(mirrors_config=MirrorsConfig(dir=good)),
               {"device": {"backend": {"config": {"mirrors": {"host": "x"}}}}})  # fmt: skip
