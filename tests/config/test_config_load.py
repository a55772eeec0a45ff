"""`load_config` and `with_overrides`: upstream's config.toml, strict types, errors naming the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nydus_core.config import (
    DEFAULT_ROOT,
    SnapshotterConfig,
    load_config,
    parse_duration,
    with_overrides,
)
from nydus_core.errors import ConfigError
from nydus_core.records import ConfigOption

# The sample config.toml shipped by upstream (misc/snapshotter/config.toml), trimmed of comments.
UPSTREAM_SAMPLE = """
version = 1
root = "/var/lib/containerd-nydus"
address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
daemon_mode = "dedicated"
cleanup_on_close = false

[system]
enable = true
address = "/run/containerd-nydus/system.sock"
[system.debug]
daemon_cpu_profile_duration_secs = 5
pprof_address = ""

[daemon]
nydusd_config = "/etc/nydus/nydusd-config.fusedev.json"
nydusd_path = "/usr/local/bin/nydusd"
nydusimage_path = "/usr/local/bin/nydus-image"
fs_driver = "fusedev"
recover_policy = "restart"
threads_number = 4
log_rotation_size = 100

[cgroup]
enable = true
memory_limit = ""

[log]
log_to_stdout = false
level = "info"
log_rotation_compress = true
log_rotation_local_time = true
log_rotation_max_age = 7
log_rotation_max_backups = 5
log_rotation_max_size = 100

[metrics]
address = ":9110"

[remote]
convert_vpc_registry = false

[remote.auth]
enable_kubeconfig_keychain = false
kubeconfig_path = ""
enable_cri_keychain = false
image_service_address = ""

[snapshot]
enable_nydus_overlayfs = false
nydus_overlayfs_path = "nydus-overlayfs"
enable_kata_volume = false
sync_remove = false

[cache_manager]
disable = false
gc_period = "24h"
cache_dir = ""

[image]
public_key_file = ""
validate_signature = false

[experimental]
enable_stargz = false
enable_referrer_detect = false
enable_index_detect = false
[experimental.tarfs]
enable_tarfs = false
mount_tarfs_on_host = false
tarfs_hint = false
max_concurrent_proc = 0
export_mode = ""
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> SnapshotterConfig:
    return load_config(write(tmp_path, text))


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "config.toml") in message
    return message


def test_no_file_gives_defaults() -> None:
    config = load_config(None)
    assert config == SnapshotterConfig()
    assert config.root == DEFAULT_ROOT
    assert config.daemon.fs_driver == "fusedev"
    assert config.log_dir == DEFAULT_ROOT / "logs"


def test_upstream_sample_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nydus_core.config")
    config = load_text(tmp_path, UPSTREAM_SAMPLE)
    assert caplog.records == []  # every key of upstream's sample is known
    assert config.root == Path("/var/lib/containerd-nydus")
    assert config.daemon.nydusd_path == "/usr/local/bin/nydusd"
    assert config.daemon.threads_number == 4
    assert config.cgroup.enable is True
    assert config.metrics.address == ":9110"
    assert config.cache_dir == Path("/var/lib/containerd-nydus/cache")


def test_minimal_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, 'version = 1\nroot = "/tmp/nyd-root"\n')
    assert config.root == Path("/tmp/nyd-root")
    assert config.log_dir == Path("/tmp/nyd-root/logs")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('root = "/x"\n', "version: missing"),
        ("version = 2\n", "version: unsupported value 2"),
        ('version = "1"\n', "version: unsupported value '1'"),
        ("version = true\n", "version: unsupported value True"),
    ],
)
def test_version_is_mandatory(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        ('[daemon]\nfs_driver = "Fuse Dev"', "daemon.fs_driver", "'Fuse Dev' is not a backend name"),
        ('[daemon]\nrecover_policy = "sometimes"', "daemon.recover_policy", "not one of"),
        ('[daemon]\nfailover_policy = "x"', "daemon.failover_policy", "not one of"),
        ('daemon_mode = "single"', "daemon_mode", "not one of"),
        ('[log]\nlevel = "loud"', "log.level", "not one of"),
        ('[experimental.tarfs]\nexport_mode = "x"', "experimental.tarfs.export_mode", "not one of"),
        ("[daemon]\nthreads_number = 1025", "daemon.threads_number", "out of range"),
        ("[daemon]\nthreads_number = -1", "daemon.threads_number", "out of range"),
        ('[daemon]\nthreads_number = "4"', "daemon.threads_number", "expected an integer, got a string"),
        ("[daemon]\nthreads_number = 4.0", "daemon.threads_number", "expected an integer, got a float"),
        ("[daemon]\nthreads_number = true", "daemon.threads_number", "expected an integer, got a boolean"),
        ('[log]\nlog_to_stdout = "yes"', "log.log_to_stdout", "expected true or false"),
        ("[daemon]\nnydusd_path = 3", "daemon.nydusd_path", "expected a string"),
        (f'root = "/{"r" * 70}"', "root", "71 bytes long, at most 70"),
        ('root = "relative/dir"', "root", "absolute"),
        (f'address = "/{"a" * 120}.sock"', "address", "unix socket path"),
        ('[cache_manager]\ngc_period = "24 hours"', "cache_manager.gc_period", "not a duration"),
        ('[metrics]\nhung_io_interval = "10"', "metrics.hung_io_interval", "not a duration"),
        ('[remote.auth]\ncredential_renewal_interval = "5x"', "remote.auth.credential_renewal_interval", ""),
        ('[cgroup]\nmemory_limit = "lots"', "cgroup.memory_limit", "not a size"),
        ("uid = -5", "uid", "out of range"),
        ("daemon = 5", "daemon", "expected a table"),
        ('[daemon]\nnydusd_config = ""', "daemon.nydusd_config", "expected a path"),
        ('[remote]\nauth = "x"', "remote.auth", "expected a table"),
        (
            '[remote.mirrors_config]\ndir = "/nonexistent/mirrors"',
            "remote.mirrors_config.dir",
            "does not exist",
        ),
        (
            "[remote.auth]\nenable_kubeconfig_keychain = true\nenable_cri_keychain = true",
            "remote.auth.enable_cri_keychain",
            "cannot be enabled together",
        ),
    ],
)
def test_bad_value_names_key_and_file(tmp_path: Path, text: str, key: str, needle: str) -> None:
    message = error_of(tmp_path, "version = 1\n" + text + "\n")
    assert f": {key}: " in message
    assert needle in message


def test_not_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in error_of(tmp_path, "version = = 1")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.toml")


def test_unknown_keys_warn_and_continue(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nydus_core.config")
    path = write(
        tmp_path,
        'version = 1\nshared_daemon = true\n[daemon]\nfs_driver = "fscache"\nbogus = 1\n'
        "[remote.auth]\nnew_keychain = true\n[future]\nx = 1\n",
    )
    config = load_config(path)
    assert config.daemon.fs_driver == "fscache"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in ("shared_daemon", "daemon.bogus", "remote.auth.new_keychain", "future"):
        assert any(f"unknown configuration key {key} " in m and str(path) in m for m in warned), key
    assert len(warned) == 4


def test_multiple_is_alias_of_dedicated(tmp_path: Path) -> None:
    assert load_text(tmp_path, 'version = 1\ndaemon_mode = "multiple"\n').daemon_mode == "dedicated"
    assert load_text(tmp_path, 'version = 1\ndaemon_mode = "shared"\n').shared_daemon
    assert SnapshotterConfig(daemon_mode="multiple").daemon_mode == "dedicated"


def test_explicit_false_is_honoured(tmp_path: Path) -> None:
    # Upstream's mergo would turn this back on; we keep what the file says.
    config = load_text(tmp_path, "version = 1\n[system]\nenable = false\n")
    assert config.system.enable is False


PLUGIN_OPTIONS = [
    ConfigOption("daemon", "warm_spare", bool, False, "a plugin's key in an upstream table"),
    ConfigOption("myplugin", "threads", int, 4, "a table of the plugin's own",
                 validator=lambda v: None if v > 0 else (_ for _ in ()).throw(ValueError("must be > 0"))),
    ConfigOption("myplugin", "ratio", float, 0.5),
]


def test_plugin_options_are_parsed_and_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = load_config(write(tmp_path, "version = 1\n"), PLUGIN_OPTIONS)
    assert [o.get(plain) for o in PLUGIN_OPTIONS] == [False, 4, 0.5]
    text = "version = 1\n[daemon]\nwarm_spare = true\n[myplugin]\nthreads = 8\nratio = 2\nextra = 1\n"
    with caplog.at_level(logging.WARNING):
        config = load_config(write(tmp_path, text), PLUGIN_OPTIONS)
    assert [o.get(config) for o in PLUGIN_OPTIONS] == [True, 8, 2.0]
    assert config.is_set("daemon.warm_spare") and not config.is_set("daemon.fs_driver")
    warned = [r.getMessage() for r in caplog.records]
    assert any("unknown configuration key myplugin.extra" in m for m in warned)
    assert not any("warm_spare" in m or "myplugin.threads" in m for m in warned)
    # without the plugin installed its keys are unknown: warned about, never fatal
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, text))
    assert any("unknown configuration key daemon.warm_spare" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[daemon]\nwarm_spare = "yes"', "daemon.warm_spare: expected true or false"),
        ("[myplugin]\nthreads = true", "myplugin.threads: expected an integer"),
        ("[myplugin]\nthreads = 0", "myplugin.threads: must be > 0"),
    ],
)
def test_bad_plugin_option_names_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "version = 1\n" + text + "\n"), PLUGIN_OPTIONS)
    assert needle in str(info.value) and str(tmp_path / "config.toml") in str(info.value)


def test_overrides_keep_plugin_options_and_what_was_set(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "version = 1\n[daemon]\nwarm_spare = true\n"), PLUGIN_OPTIONS)
    flags = {"daemon.fs_driver": "mine", "myplugin.threads": 2}
    flagged = with_overrides(config, flags, options=PLUGIN_OPTIONS)
    assert flagged.daemon.fs_driver == "mine" and flagged.plugin_options == {
        "daemon.warm_spare": True, "myplugin.threads": 2}
    assert flagged.is_set("daemon.fs_driver") and flagged.is_set("daemon.warm_spare")
    assert not flagged.is_set("daemon.recover_policy")


def test_paths_become_paths(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, 'version = 1\n[log]\ndir = "/var/log/nydus"\n[cache_manager]\ncache_dir = "/c"'
    )
    assert config.log_dir == Path("/var/log/nydus")
    assert config.cache_dir == Path("/c")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("0s", 0),
        ("10s", 10),
        ("1m", 60),
        ("24h", 86400),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "1d", "-1s", "1 h", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_overrides_win_over_file(tmp_path: Path) -> None:
    base = load_text(tmp_path, 'version = 1\nroot = "/tmp/from-file"\n[daemon]\nfs_driver = "fusedev"\n')
    merged = with_overrides(
        base,
        {"root": Path("/tmp/from-flag"), "daemon.fs_driver": "fscache", "daemon_mode": "multiple"},
    )
    assert merged.root == Path("/tmp/from-flag")
    assert merged.daemon.fs_driver == "fscache"
    assert merged.daemon_mode == "dedicated"
    assert merged.log_dir == Path("/tmp/from-flag/logs")
    # the original is untouched
    assert base.root == Path("/tmp/from-file")
    assert base.daemon.fs_driver == "fusedev"


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^command line: daemon.fs_driver: 'zfs/x' is not a backend name"):
        with_overrides(SnapshotterConfig(), {"daemon.fs_driver": "zfs/x"})
    with pytest.raises(ConfigError, match=r"^--root: root: .* at most 70"):
        with_overrides(SnapshotterConfig(), {"root": "/" + "x" * 80}, source="--root")
    with pytest.raises(ConfigError, match="no such configuration key"):
        with_overrides(SnapshotterConfig(), {"daemon.nope": 1})
