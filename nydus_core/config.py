"""The nydus-snapshotter ``config.toml``, modelled with attrs.

Section and key names are upstream's (``version = 1``, ``root``, ``address``, ``[daemon]``,
``[log]``, ``[remote]``, ``[snapshot]``, ``[cache_manager]``, ``[metrics]``, ``[system]``,
``[experimental]``) so that users keep the file they have. Loading (tomli + cattrs, errors that
name the key and the file, warnings for unknown keys) lives in `load_config`.
"""

from __future__ import annotations

from pathlib import Path

import attrs

DEFAULT_ROOT = Path("/var/lib/containerd/io.containerd.snapshotter.v1.nydus")
DEFAULT_ADDRESS = Path("/run/containerd-nydus/containerd-nydus-grpc.sock")
DEFAULT_SYSTEM_ADDRESS = Path("/run/containerd-nydus/system.sock")
DEFAULT_NYDUSD_CONFIG = Path("/etc/nydus/nydusd-config.json")
# Our Python daemon; never named `nydusd` so it cannot shadow a real nydusd on the PATH.
DEFAULT_NYDUSD = "nydusd-py"

FS_DRIVERS = ("fusedev", "fscache", "blockdev", "proxy", "nodev")
DAEMON_MODES = ("multiple", "dedicated", "shared", "none")
RECOVER_POLICIES = ("none", "restart", "failover")
FAILOVER_POLICIES = ("none", "resend", "flush")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic")


@attrs.define
class DaemonConfig:
    nydusd_config: Path = DEFAULT_NYDUSD_CONFIG
    nydusd_path: str = DEFAULT_NYDUSD
    nydusimage_path: str = "nydus-image"
    fs_driver: str = "fusedev"
    recover_policy: str = "restart"
    threads_number: int = 0
    log_rotation_size: int = 100
    failover_policy: str = "resend"


@attrs.define
class LogConfig:
    log_to_stdout: bool = False
    level: str = "info"
    dir: Path | None = None  # default <root>/logs
    log_rotation_compress: bool = True
    log_rotation_local_time: bool = True
    log_rotation_max_age: int = 7
    log_rotation_max_backups: int = 5
    log_rotation_max_size: int = 100


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
    credential_renewal_interval: str = "0s"


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
    gc_period: str = "24h"
    cache_dir: Path | None = None  # default <root>/cache


@attrs.define
class ImageConfig:
    public_key_file: str = ""
    validate_signature: bool = False


@attrs.define
class MetricsConfig:
    address: str = ""
    hung_io_interval: str = "10s"
    collect_interval: str = "1m"


@attrs.define
class SystemDebugConfig:
    daemon_cpu_profile_duration_secs: int = 5
    pprof_address: str = ""


@attrs.define
class SystemConfig:
    enable: bool = True
    address: Path = DEFAULT_SYSTEM_ADDRESS
    uid: int = 0
    gid: int = 0
    debug: SystemDebugConfig = attrs.Factory(SystemDebugConfig)


@attrs.define
class CgroupConfig:
    enable: bool = False
    memory_limit: str = ""


@attrs.define
class TarfsConfig:
    enable_tarfs: bool = False
    mount_tarfs_on_host: bool = False
    tarfs_hint: bool = False
    max_concurrent_proc: int = 0
    export_mode: str = ""


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
    root: Path = DEFAULT_ROOT
    address: Path = DEFAULT_ADDRESS
    uid: int = 0
    gid: int = 0
    daemon_mode: str = "dedicated"
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

    @property
    def cache_dir(self) -> Path:
        return self.cache_manager.cache_dir or self.root / "cache"

    @property
    def log_dir(self) -> Path:
        return self.log.dir or self.root / "logs"

    @property
    def shared_daemon(self) -> bool:
        return self.daemon_mode == "shared"
