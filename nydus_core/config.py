"""The nydus-snapshotter ``config.toml``, modelled with attrs.

Section and key names are upstream's (``version = 1``, ``root``, ``address``, ``[daemon]``,
``[log]``, ``[remote]``, ``[snapshot]``, ``[cache_manager]``, ``[metrics]``, ``[system]``,
``[experimental]``) so that users keep the file they have.

`load_config` reads a file with tomli and structures it with cattrs into `SnapshotterConfig`:

* ``version = 1`` is mandatory (upstream refuses a file without it, and so do we);
* a wrong type or a bad value raises `nydus_core.errors.ConfigError` whose one-line message names
  the file and the dotted key (``/etc/nydus/config.toml: daemon.fs_driver: ...``), because a
  snapshotter that half-understands its configuration is worse than one that refuses to start;
* an unknown key is logged as a warning naming the dotted key and the file, and ignored, so a
  file written for a newer upstream release still works;
* ``daemon_mode = "multiple"`` (upstream's default name) is stored as its alias ``dedicated``;
* ``[daemon] fs_driver`` is any backend name: the installed backend records decide (start-up
  refuses a configured name no installed plugin provides, with the pip extra that would);
* keys that plugins register (`nydus_core.records.ConfigOption`, passed as ``options``) are parsed
  and type-checked like the core's and land in `SnapshotterConfig.plugin_options`;
* `SnapshotterConfig.explicit` records the dotted keys the file (or the flags) set, so that
  start-up can tell "configured" from "the default".

One deliberate difference: upstream merges defaults into zero-valued fields, so a boolean whose
default is true cannot be switched off in the file. Here an explicit ``false`` is honoured.

`with_overrides` applies command-line flags on top (flags win over the file) with the same
validation.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
import tomli

from nydus_core.errors import ConfigError
from nydus_core.records import ConfigOption

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/containerd/io.containerd.snapshotter.v1.nydus")
DEFAULT_ADDRESS = Path("/run/containerd-nydus/containerd-nydus-grpc.sock")
DEFAULT_SYSTEM_ADDRESS = Path("/run/containerd-nydus/system.sock")
DEFAULT_NYDUSD_CONFIG = Path("/etc/nydus/nydusd-config.json")
# Our Python daemon; never named `nydusd` so it cannot shadow a real nydusd on the PATH.
DEFAULT_NYDUSD = "nydusd-py"

# Upstream's fs_driver values (for help texts); any name a backend record has is accepted.
FS_DRIVERS = ("fusedev", "fscache", "blockdev", "proxy", "nodev")
DEFAULT_FS_DRIVER = "fusedev"
_BACKEND_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
DAEMON_MODES = ("multiple", "dedicated", "shared", "none")
RECOVER_POLICIES = ("none", "restart", "failover")
FAILOVER_POLICIES = ("none", "resend", "flush")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic")
TARFS_EXPORT_MODES = (
    "",
    "none",
    "layer_verity_only",
    "image_verity_only",
    "layer_block",
    "image_block",
    "layer_block_with_verity",
    "image_block_with_verity",
)

# Upstream keeps the root short: daemon sockets and mountpoints live below it and a unix socket
# path may not exceed 107 bytes.
MAX_ROOT_BYTES = 70
MAX_SOCKET_PATH_BYTES = 107
MAX_THREADS = 1024

# Go's time.ParseDuration syntax, which upstream uses: "0", or number+unit groups ("1h30m").
_DURATION_RE = re.compile(r"^[+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# [cgroup] memory_limit: plain bytes, a size with a binary or decimal unit, or a percentage.
_MEMORY_RE = re.compile(r"^(?:\d+(?:\.\d+)?\s*(?:[kKmMgGtT]i?[bB]?|[bB])?|\d+(?:\.\d+)?%)$")


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration (``"24h"``, ``"1m30s"``, ``"500ms"``, ``"0"``).

    Raises `ValueError` for anything else, so a typo such as ``"24 hours"`` fails at start-up
    instead of silently disabling a timer.
    """
    if text == "0":
        return 0.0
    if not _DURATION_RE.match(text):
        raise ValueError(f'{text!r} is not a duration (examples: "10s", "1m", "24h", "1h30m", "0")')
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text))


# --------------------------------------------------------------------------------------------
# Validators. They raise ValueError; `_validate_tree` adds the dotted key and the file.
# --------------------------------------------------------------------------------------------


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, attrs.Attribute[Any], str], None]:
    def check(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{value!r} is not one of {shown}")

    return check


def _int_range(lo: int, hi: int | None = None) -> Callable[[Any, attrs.Attribute[Any], int], None]:
    def check(_inst: Any, _attr: attrs.Attribute[Any], value: int) -> None:
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{value} is out of range (must be {bound})")

    return check


def _duration(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    parse_duration(value)


def _memory_limit(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if value and not _MEMORY_RE.match(value.strip()):
        raise ValueError(f'{value!r} is not a size (examples: "209715200", "200MiB", "200Mi", "10%")')


def _short_root(_inst: Any, _attr: attrs.Attribute[Any], value: Path) -> None:
    size = len(str(value).encode())
    if size > MAX_ROOT_BYTES:
        raise ValueError(f"{str(value)!r} is {size} bytes long, at most {MAX_ROOT_BYTES} are allowed")
    if not value.is_absolute():
        raise ValueError(f"{str(value)!r} must be an absolute path")


def _socket_path(_inst: Any, _attr: attrs.Attribute[Any], value: Path) -> None:
    size = len(str(value).encode())
    if size > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"{str(value)!r} is {size} bytes long; a unix socket path has at most {MAX_SOCKET_PATH_BYTES}"
        )


def _backend_name(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not _BACKEND_NAME.match(value):
        shown = ", ".join(repr(c) for c in FS_DRIVERS)
        raise ValueError(f"{value!r} is not a backend name (upstream's are {shown})")


def _canonical_daemon_mode(value: str) -> str:
    """Upstream calls dedicated mode ``multiple`` (its default); we store one canonical name."""
    return "dedicated" if value == "multiple" else value


_non_negative = _int_range(0)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@attrs.define
class DaemonConfig:
    """``[daemon]``: upstream's keys (a backend plugin may add its own, `ConfigOption`)."""

    nydusd_config: Path = DEFAULT_NYDUSD_CONFIG
    nydusd_path: str = DEFAULT_NYDUSD
    nydusimage_path: str = "nydus-image"
    fs_driver: str = attrs.field(default=DEFAULT_FS_DRIVER, validator=_backend_name)
    recover_policy: str = attrs.field(default="restart", validator=_one_of(RECOVER_POLICIES))
    threads_number: int = attrs.field(default=0, validator=_int_range(0, MAX_THREADS))
    log_rotation_size: int = attrs.field(default=100, validator=_non_negative)
    failover_policy: str = attrs.field(default="resend", validator=_one_of(FAILOVER_POLICIES))


@attrs.define
class LogConfig:
    log_to_stdout: bool = False
    level: str = attrs.field(default="info", validator=_one_of(LOG_LEVELS))
    dir: Path | None = None  # default <root>/logs
    log_rotation_compress: bool = True
    log_rotation_local_time: bool = True
    log_rotation_max_age: int = attrs.field(default=7, validator=_non_negative)
    log_rotation_max_backups: int = attrs.field(default=5, validator=_non_negative)
    log_rotation_max_size: int = attrs.field(default=100, validator=_non_negative)


@attrs.define
class MirrorsConfig:
    dir: Path | None = None


@attrs.define
class AuthConfig:
    enable_kubeconfig_keychain: bool = False
    kubeconfig_path: str = ""
    enable_cri_keychain: bool = False
    image_service_address: str = "/run/containerd/containerd.sock"
    enable_kubelet_credential_providers: bool = False
    credential_provider_config: str = ""
    credential_provider_bin_dir: str = ""
    credential_renewal_interval: str = attrs.field(default="0s", validator=_duration)


@attrs.define
class RemoteConfig:
    convert_vpc_registry: bool = False
    skip_ssl_verify: bool = False
    mirrors_config: MirrorsConfig = attrs.Factory(MirrorsConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)


@attrs.define
class SnapshotConfig:
    enable_nydus_overlayfs: bool = False
    nydus_overlayfs_path: str = "nydus-overlayfs"
    enable_kata_volume: bool = False
    sync_remove: bool = False
    enable_overlayfs_volatile: bool = False


@attrs.define
class CacheManagerConfig:
    disable: bool = False
    gc_period: str = attrs.field(default="24h", validator=_duration)
    cache_dir: Path | None = None  # default <root>/cache


@attrs.define
class ImageConfig:
    public_key_file: str = ""
    validate_signature: bool = False


@attrs.define
class MetricsConfig:
    address: str = ""
    hung_io_interval: str = attrs.field(default="10s", validator=_duration)
    collect_interval: str = attrs.field(default="1m", validator=_duration)


@attrs.define
class SystemDebugConfig:
    daemon_cpu_profile_duration_secs: int = attrs.field(default=5, validator=_non_negative)
    pprof_address: str = ""


@attrs.define
class SystemConfig:
    enable: bool = True
    address: Path = attrs.field(default=DEFAULT_SYSTEM_ADDRESS, validator=_socket_path)
    uid: int = attrs.field(default=0, validator=_non_negative)
    gid: int = attrs.field(default=0, validator=_non_negative)
    debug: SystemDebugConfig = attrs.Factory(SystemDebugConfig)


@attrs.define
class CgroupConfig:
    enable: bool = False
    memory_limit: str = attrs.field(default="", validator=_memory_limit)


@attrs.define
class TarfsConfig:
    enable_tarfs: bool = False
    mount_tarfs_on_host: bool = False
    tarfs_hint: bool = False
    max_concurrent_proc: int = attrs.field(default=0, validator=_non_negative)
    export_mode: str = attrs.field(default="", validator=_one_of(TARFS_EXPORT_MODES))


@attrs.define
class ExperimentalConfig:
    enable_stargz: bool = False
    enable_referrer_detect: bool = False
    enable_index_detect: bool = False
    enable_backend_source: bool = False
    tarfs: TarfsConfig = attrs.Factory(TarfsConfig)


@attrs.define
class SnapshotterConfig:
    """The whole file. Paths left ``None`` default to a place under ``root`` (see helpers)."""

    version: int = 1
    root: Path = attrs.field(default=DEFAULT_ROOT, validator=_short_root)
    address: Path = attrs.field(default=DEFAULT_ADDRESS, validator=_socket_path)
    uid: int = attrs.field(default=0, validator=_non_negative)
    gid: int = attrs.field(default=0, validator=_non_negative)
    daemon_mode: str = attrs.field(
        default="dedicated", converter=_canonical_daemon_mode, validator=_one_of(DAEMON_MODES)
    )
    cleanup_on_close: bool = False
    system: SystemConfig = attrs.Factory(SystemConfig)
    metrics: MetricsConfig = attrs.Factory(MetricsConfig)
    daemon: DaemonConfig = attrs.Factory(DaemonConfig)
    cgroup: CgroupConfig = attrs.Factory(CgroupConfig)
    log: LogConfig = attrs.Factory(LogConfig)
    remote: RemoteConfig = attrs.Factory(RemoteConfig)
    snapshot: SnapshotConfig = attrs.Factory(SnapshotConfig)
    cache_manager: CacheManagerConfig = attrs.Factory(CacheManagerConfig)
    image: ImageConfig = attrs.Factory(ImageConfig)
    experimental: ExperimentalConfig = attrs.Factory(ExperimentalConfig)
    # Not TOML keys (metadata internal): values of plugin-registered keys by dotted key, and the
    # dotted keys the file and the flags set.
    plugin_options: dict[str, Any] = attrs.field(factory=dict, metadata={"internal": True})
    explicit: frozenset[str] = attrs.field(factory=frozenset, metadata={"internal": True})

    def is_set(self, dotted: str) -> bool:
        """Whether the file or the flags set `dotted` (``daemon.fs_driver``), rather than it
        holding its default."""
        return dotted in self.explicit

    @property
    def cache_dir(self) -> Path:
        return self.cache_manager.cache_dir or self.root / "cache"

    @property
    def log_dir(self) -> Path:
        return self.log.dir or self.root / "logs"

    @property
    def shared_daemon(self) -> bool:
        return self.daemon_mode == "shared"


_SECTIONS: tuple[type, ...] = (
    DaemonConfig,
    LogConfig,
    MirrorsConfig,
    AuthConfig,
    RemoteConfig,
    SnapshotConfig,
    CacheManagerConfig,
    ImageConfig,
    MetricsConfig,
    SystemDebugConfig,
    SystemConfig,
    CgroupConfig,
    TarfsConfig,
    ExperimentalConfig,
    SnapshotterConfig,
)
for _cls in _SECTIONS:
    attrs.resolve_types(_cls)


# --------------------------------------------------------------------------------------------
# Structuring: strict scalar types (TOML has real types; "yes" is not a boolean)
# --------------------------------------------------------------------------------------------


class _WrongType(TypeError):
    """A TOML value of the wrong type; the message is shown to the user as is."""


def _toml_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _structure_bool(value: object, _t: type) -> bool:
    if not isinstance(value, bool):
        raise _WrongType(f"expected true or false, got {_toml_type(value)} ({value!r})")
    return value


def _structure_int(value: object, _t: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _WrongType(f"expected an integer, got {_toml_type(value)} ({value!r})")
    return value


def _structure_str(value: object, _t: type) -> str:
    if not isinstance(value, str):
        raise _WrongType(f"expected a string, got {_toml_type(value)} ({value!r})")
    return value


def _structure_path(value: object, _t: type) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise _WrongType(f"expected a path (a non-empty string), got {_toml_type(value)} ({value!r})")
    return Path(value)


def _structure_optional_path(value: object, _t: object) -> Path | None:
    # Upstream's sample file writes `cache_dir = ""` for "the default under root".
    if value is None or value == "":
        return None
    return _structure_path(value, Path)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(Path, _structure_path)
    conv.register_structure_hook_func(lambda t: t == (Path | None), _structure_optional_path)
    conv.register_unstructure_hook(Path, str)
    return conv


_converter = _make_converter()


def _format_structure_error(exc: BaseException, _type: type | None) -> str:
    if isinstance(exc, _WrongType):
        return str(exc)
    if isinstance(exc, AttributeError | TypeError) and "items" in str(exc):
        return "expected a table"
    return f"invalid value ({exc})"


def _split_cattrs_message(message: str) -> tuple[str, str]:
    """``"expected ... @ $.daemon.threads_number"`` -> (``daemon.threads_number``, problem)."""
    problem, _, where = message.rpartition(" @ ")
    key = where.removeprefix("$").removeprefix(".") or "<top level>"
    return key, problem


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: Path | None, options: Iterable[ConfigOption] = ()) -> SnapshotterConfig:
    """Read and validate a ``config.toml``; ``None`` gives the defaults.

    :param options: the keys plugins registered (``pm.registry.config_options()``); they are
        checked like the core's keys and not warned about.
    :raises ConfigError: the file is missing or unreadable, is not TOML, lacks ``version = 1``,
        or holds a value of the wrong type or out of range. The message names the file and the
        dotted key.
    """
    if path is None:
        return SnapshotterConfig()
    try:
        data = tomli.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc}") from None
    except tomli.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_mapping(data, source=str(path), options=options)


def config_from_mapping(
    data: Mapping[str, Any], *, source: str, options: Iterable[ConfigOption] = ()
) -> SnapshotterConfig:
    """Validate an already parsed TOML document; `source` names it in messages and warnings."""
    if "version" not in data:
        raise ConfigError(f"{source}: version: missing; the file must contain `version = 1`")
    if data["version"] != 1 or isinstance(data["version"], bool):
        raise ConfigError(f"{source}: version: unsupported value {data['version']!r}, expected 1")
    by_key = {o.dotted: o for o in options}
    plugin_values: dict[str, Any] = {}
    explicit: set[str] = set()
    known = _drop_unknown_keys(data, SnapshotterConfig, source=source, prefix="", options=by_key,
                               plugin_values=plugin_values, explicit=explicit)  # fmt: skip
    config = _structure(known, source)
    _validate_tree(config, source, prefix="")
    _check_cross_field(config, source)
    config.plugin_options = _check_plugin_values(plugin_values, by_key, source)
    config.explicit = frozenset(explicit)
    return config


def _check_plugin_values(
    values: Mapping[str, Any], options: Mapping[str, ConfigOption], source: str
) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for dotted, value in values.items():
        option = options[dotted]
        wanted = option.type
        ok = isinstance(value, wanted) and not (wanted is not bool and isinstance(value, bool))
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[wanted]
            raise ConfigError(f"{source}: {dotted}: expected {name}, got {_toml_type(value)} ({value!r})")
        if option.validator is not None:
            try:
                option.validator(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{source}: {dotted}: {exc}") from None
        checked[dotted] = value
    return checked


def _drop_unknown_keys(
    data: Mapping[str, Any],
    cls: type | None,
    *,
    source: str,
    prefix: str,
    options: Mapping[str, ConfigOption],
    plugin_values: dict[str, Any],
    explicit: set[str],
) -> dict[str, Any]:
    """Warn about (and drop) keys neither the model nor a plugin knows, recursing into known
    tables; plugin keys go to `plugin_values`, every key seen to `explicit`. `cls` is ``None``
    for a table only plugins define."""
    fields = {f.name: f for f in attrs.fields(cls) if not f.metadata.get("internal")} if cls else {}
    kept: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = fields.get(key)
        if field is None:
            if dotted in options:
                plugin_values[dotted] = value
                explicit.add(dotted)
            elif isinstance(value, Mapping) and any(o.startswith(dotted + ".") for o in options):
                _drop_unknown_keys(value, None, source=source, prefix=f"{dotted}.", options=options,
                                   plugin_values=plugin_values, explicit=explicit)  # fmt: skip
            else:
                log.warning("%s: unknown configuration key %s (ignored)", source, dotted)
            continue
        explicit.add(dotted)
        if isinstance(field.type, type) and attrs.has(field.type):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: {dotted}: expected a table ([{dotted}]), got {_toml_type(value)}"
                )
            kept[key] = _drop_unknown_keys(value, field.type, source=source, prefix=f"{dotted}.",
                                           options=options, plugin_values=plugin_values,
                                           explicit=explicit)  # fmt: skip
        else:
            kept[key] = value
    return kept


def _structure(data: Mapping[str, Any], source: str) -> SnapshotterConfig:
    # Validators run afterwards in `_validate_tree`, which knows the dotted key of each value.
    with attrs.validators.disabled():
        try:
            return _converter.structure(data, SnapshotterConfig)
        except Exception as exc:
            messages = cattrs.transform_error(exc, format_exception=_format_structure_error)
            key, problem = _split_cattrs_message(messages[0])
            more = f" (and {len(messages) - 1} more problem(s))" if len(messages) > 1 else ""
            raise ConfigError(f"{source}: {key}: {problem}{more}") from None


def _validate_tree(obj: Any, source: str, *, prefix: str) -> None:
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        dotted = f"{prefix}{field.name}"
        if field.validator is not None:
            try:
                field.validator(obj, field, value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{source}: {dotted}: {exc}") from None
        if attrs.has(type(value)):
            _validate_tree(value, source, prefix=f"{dotted}.")


def _check_cross_field(config: SnapshotterConfig, source: str) -> None:
    auth = config.remote.auth
    if auth.enable_kubeconfig_keychain and auth.enable_cri_keychain:
        raise ConfigError(
            f"{source}: remote.auth.enable_cri_keychain: cannot be enabled together with "
            "remote.auth.enable_kubeconfig_keychain"
        )
    mirrors = config.remote.mirrors_config.dir
    if mirrors is not None and not mirrors.is_dir():
        raise ConfigError(f"{source}: remote.mirrors_config.dir: directory {str(mirrors)!r} does not exist")


def with_overrides(
    config: SnapshotterConfig,
    overrides: Mapping[str, Any],
    *,
    source: str = "command line",
    options: Iterable[ConfigOption] = (),
) -> SnapshotterConfig:
    """A copy of `config` with dotted keys replaced (``{"daemon.fs_driver": "fscache"}``).

    Used for command-line flags, which win over the file. Values are checked exactly like the
    file's; a bad one raises `ConfigError` naming `source` and the key. `config` is unchanged;
    its plugin options and the keys it had set carry over (`options` are the plugin keys that
    may be overridden too).
    """
    data = _converter.unstructure(config)
    for internal in ("plugin_options", "explicit"):
        data.pop(internal, None)
    by_key = {o.dotted: o for o in options}
    plugin_values: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if dotted in by_key:
            plugin_values[dotted] = value
            continue
        table = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(table.get(part), dict):
                raise ConfigError(f"{source}: {dotted}: no such configuration key")
            table = table[part]
        if leaf not in table:
            raise ConfigError(f"{source}: {dotted}: no such configuration key")
        table[leaf] = str(value) if isinstance(value, Path) else value
    result = config_from_mapping(copy.deepcopy(data), source=source)
    result.plugin_options = {**config.plugin_options, **_check_plugin_values(plugin_values, by_key, source)}
    result.explicit = config.explicit | frozenset(overrides)
    return result
