"""Credentials providers: snapshot labels first, then the docker config file."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from nydus_core import labels as L
from nydus_core.data.remote.auth import docker_config_path, from_docker_config, from_labels, normalize_host
from nydus_core.data.remote.credentials import Credentials
from nydus_core.plugins import build_plugin_manager


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_docker_config(directory: Path, auths: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"auths": auths}))
    return directory


def test_nydus_credentials_labels_win_over_docker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(write_docker_config(tmp_path / "dc", {
        "quay.io": {"auth": b64("file-user:file-pass")},
    })))  # fmt: skip
    pm = build_plugin_manager(entry_points=False, env={})
    labels = {L.PULL_USERNAME: "label-user", L.PULL_SECRET: "label-pass"}
    got = pm.hook.nydus_credentials(host="quay.io", ref="quay.io/a/b", labels=labels)
    assert got == Credentials("label-user", "label-pass")
    got = pm.hook.nydus_credentials(host="quay.io", ref="quay.io/a/b", labels={})
    assert got == Credentials("file-user", "file-pass")
    assert pm.hook.nydus_credentials(host="ghcr.io", ref="ghcr.io/a/b", labels={}) is None


def test_nydus_credentials_third_party_between_labels_and_docker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nydus_core.hookspecs import hookimpl

    class Keychain:
        @hookimpl
        def nydus_credentials(self, host: str, ref: str, labels: dict[str, str]) -> Credentials | None:
            return Credentials("kc", "kc-secret") if host == "quay.io" else None

    monkeypatch.setenv("DOCKER_CONFIG", str(write_docker_config(tmp_path / "dc", {
        "quay.io": {"auth": b64("file-user:file-pass")},
    })))  # fmt: skip
    pm = build_plugin_manager([Keychain()], entry_points=False, env={})
    assert pm.hook.nydus_credentials(host="quay.io", ref="r", labels={}) == Credentials("kc", "kc-secret")
    labels = {L.PULL_USERNAME: "u", L.PULL_SECRET: "p"}
    assert pm.hook.nydus_credentials(host="quay.io", ref="r", labels=labels) == Credentials("u", "p")


def test_nydus_credentials_from_labels() -> None:
    assert from_labels({L.PULL_USERNAME: "u", L.PULL_SECRET: "p"}) == Credentials("u", "p")
    assert from_labels({L.PULL_USERNAME: "", L.PULL_SECRET: "tok"}) == Credentials("", "tok")
    assert from_labels({L.PULL_USERNAME: "u"}) is None
    assert from_labels({}) is None


def test_nydus_credentials_docker_config_entry_kinds(tmp_path: Path) -> None:
    env = {"DOCKER_CONFIG": str(write_docker_config(tmp_path / "dc", {
        "https://index.docker.io/v1/": {"auth": b64("hub:pw:with:colons")},
        "localhost:5000": {"username": "lu", "password": "lp"},
        "http://reg.example:8443/v2/": {"identitytoken": "refresh-token"},
        "broken.example": {"auth": "%%%not-base64"},
        "empty.example": {},
    }))}  # fmt: skip
    assert from_docker_config("docker.io", env) == Credentials("hub", "pw:with:colons")
    assert from_docker_config("index.docker.io", env) == Credentials("hub", "pw:with:colons")
    assert from_docker_config("localhost:5000", env) == Credentials("lu", "lp")
    assert from_docker_config("localhost:5001", env) is None
    assert from_docker_config("reg.example:8443", env) == Credentials("", "refresh-token")
    assert from_docker_config("broken.example", env) is None
    assert from_docker_config("empty.example", env) is None


def test_nydus_credentials_docker_config_location(tmp_path: Path) -> None:
    write_docker_config(tmp_path / "home" / ".docker", {"docker.io": {"auth": b64("h:p")}})
    env = {"HOME": str(tmp_path / "home")}
    assert docker_config_path(env) == tmp_path / "home" / ".docker" / "config.json"
    assert from_docker_config("docker.io", env) == Credentials("h", "p")
    # $DOCKER_CONFIG wins over $HOME, even when it has no entry for the host
    env["DOCKER_CONFIG"] = str(tmp_path / "elsewhere")
    assert from_docker_config("docker.io", env) is None


def test_nydus_credentials_unreadable_config_is_ignored_without_leaking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    d = tmp_path / "dc"
    d.mkdir()
    (d / "config.json").write_text('{"auths": {"x": {"auth": "c2VjcmV0"}}')  # truncated JSON
    assert from_docker_config("x", {"DOCKER_CONFIG": str(d)}) is None
    assert "unreadable" in caplog.text and "c2VjcmV0" not in caplog.text


def test_nydus_credentials_repr_hides_secret() -> None:
    assert "hunter2" not in repr(Credentials("u", "hunter2"))


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("http://Localhost:5000/v2/", "localhost:5000"),
        ("quay.io", "quay.io"),
    ],
)
def test_normalize_host(name: str, want: str) -> None:
    assert normalize_host(name) == want
