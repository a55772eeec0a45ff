"""``containerd-nydus-grpc``: the snapshotter process containerd's proxy plugin talks to.

Flag names are upstream's, so existing systemd units keep working; flags override the
``--config`` file. Start-up, in order:

1. build the plugin manager (built-ins, then ``nydus_core.plugins`` entry points) and its
   registry of records (two plugins providing one backend stop start-up here);
2. load and validate the configuration, with the keys plugins registered (a bad file is one
   line on stderr and exit status 1);
3. set up logging (``<root>/logs/nydus-snapshotter.log``, ``0640``, or stdout);
4. open the daemon manager: check the configured backend is installed and can serve the
   configured mode, recover the daemons recorded by a previous run;
5. open the metastore (`Snapshotter`) and listen on the socket (``0660``);
6. fire `nydus_snapshotter_started`;
7. start the system controller API (``[system] enable``, socket ``[system] address``, ``0600``).

SIGTERM or SIGINT stops serving within a second, fires `nydus_snapshotter_stopping`, closes the
metastore and the daemon records, and exits with status 0. Daemons are **not** stopped: running
containers read their root filesystems through them, and the next start re-adopts them.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nydus_core
from nydus_core.cli.lifecycle import StartupError
from nydus_core.cli.logsetup import BufferedRecords, setup_logging
from nydus_core.config import (
    DAEMON_MODES,
    FS_DRIVERS,
    LOG_LEVELS,
    RECOVER_POLICIES,
    SnapshotterConfig,
    load_config,
    with_overrides,
)
from nydus_core.errors import ConfigError
from nydus_core.plugins import NydusPluginManager, PluginConflict, build_plugin_manager, list_plugins, listing

log = logging.getLogger("nydus_core.cli.snapshotter")

PROG = "containerd-nydus-grpc"
LIVENESS_INTERVAL = 5.0  # seconds between daemon liveness sweeps

# flag dest -> dotted configuration key
FLAG_KEYS = {
    "root": "root",
    "address": "address",
    "nydusd_path": "daemon.nydusd_path",
    "nydus_image": "daemon.nydusimage_path",
    "nydusd_config": "daemon.nydusd_config",
    "nydus_overlayfs_path": "snapshot.nydus_overlayfs_path",
    "daemon_mode": "daemon_mode",
    "fs_driver": "daemon.fs_driver",
    "recover_policy": "daemon.recover_policy",
    "log_level": "log.level",
    "log_dir": "log.dir",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="containerd remote snapshotter serving nydus, eStargz and OCI images (nydus-core).",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file (upstream's config.toml)")
    p.add_argument("--root", type=Path, help="data directory (at most 70 bytes)")
    p.add_argument("--address", type=Path, help="unix socket to serve the snapshots API on")
    p.add_argument("--nydusd-path", "--nydusd", dest="nydusd_path", help="daemon program to run")
    p.add_argument("--nydus-image", dest="nydus_image", help="path of the nydus-image tool")
    p.add_argument(
        "--nydusd-config", "--config-path", dest="nydusd_config", type=Path, help="nydusd JSON template"
    )
    p.add_argument("--nydus-overlayfs-path", help="nydus-overlayfs mount helper path or name")
    p.add_argument("--daemon-mode", choices=DAEMON_MODES)
    p.add_argument("--fs-driver", metavar="NAME",
                   help=f"backend serving lazily pulled images (upstream's: {', '.join(FS_DRIVERS)}; "
                        "see --list-plugins for the installed ones)")  # fmt: skip
    p.add_argument("--recover-policy", choices=RECOVER_POLICIES)
    p.add_argument("--enable-stargz", action="store_true",
                   help="serve eStargz layers lazily ([experimental] enable_stargz; "
                        "needs nydus-core[stargz])")  # fmt: skip
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument(
        "--log-to-stdout",
        action="store_true",
        default=None,
        help="log to stdout instead of <log dir>/nydus-snapshotter.log (applied only if given)",
    )
    p.add_argument("--log-dir", type=Path, help="log directory (default <root>/logs)")
    p.add_argument("--version", action="store_true", help="print version, Python and plugins, then exit")
    p.add_argument("--list-plugins", action="store_true",
                   help="print one line per installed plugin record (kind, name, distribution, version) "
                        "and the plugins the allow/deny list keeps out, then exit")  # fmt: skip
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted configuration keys the given flags set."""
    overrides = {
        key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None
    }
    if args.log_to_stdout:
        overrides["log.log_to_stdout"] = True
    if args.enable_stargz:
        overrides["experimental.enable_stargz"] = True
    return overrides


def version_text(pm: NydusPluginManager) -> str:
    """What ``--version`` prints: our version, the Python running us, and the plugins it loads."""
    lines = [
        f"{PROG} (nydus-core) {nydus_core.__version__}",
        f"Python {platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "Plugins:",
    ]
    lines += [f"  {info.describe()}" for info in list_plugins(pm)] or ["  (none)"]
    failed = pm.failed if isinstance(pm, NydusPluginManager) else []
    if failed:
        lines.append("Plugins that failed to load:")
        lines += [f"  {f.error}" for f in failed]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``containerd-nydus-grpc``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.version or args.list_plugins:
        try:
            with BufferedRecords():  # plugin load errors are listed in the output instead
                pm = build_plugin_manager()
        except PluginConflict as exc:
            return _fail(f"plugin conflict: {exc}")
        print(version_text(pm) if args.version else "\n".join(listing(pm)))
        return 0

    buffered = BufferedRecords()
    try:
        with buffered:
            pm = build_plugin_manager()
            options = pm.registry.config_options()
            config = load_config(args.config, options)
            overrides = overrides_from(args)
            if overrides:
                config = with_overrides(config, overrides, source="command line", options=options)
        # The root first, private like containerd's own snapshotter roots; logs live below it.
        config.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        setup_logging(config.log, config.log_dir)
    except PluginConflict as exc:
        _replay_to_stderr(buffered)
        return _fail(f"plugin conflict: {exc}")
    except ConfigError as exc:
        _replay_to_stderr(buffered)
        return _fail(f"invalid configuration: {exc}")
    except OSError as exc:
        return _fail(f"cannot create the root or open the log: {exc}")
    buffered.replay()

    try:
        return run(config, args.config, pm)
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        return _fail(str(exc))
    except ConfigError as exc:
        log.error("start-up failed: %s", exc)
        return _fail(f"invalid configuration: {exc}")
    except Exception as exc:
        log.exception("start-up failed")
        return _fail(f"start-up failed: {type(exc).__name__}: {exc}")


def run(config: SnapshotterConfig, config_path: Path | None, pm: NydusPluginManager | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: types.FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve_until(stop, received, config, config_path, pm or build_plugin_manager())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve_until(
    stop: threading.Event,
    received: list[str],
    config: SnapshotterConfig,
    config_path: Path | None,
    pm: NydusPluginManager,
) -> int:
    from nydus_core.cli.lifecycle import RunningSnapshotter

    log.info(
        "%s %s starting (pid %d, Python %s)",
        PROG,
        nydus_core.__version__,
        os.getpid(),
        platform.python_version(),
    )
    if config_path is not None:
        log.info("configuration file: %s", config_path.absolute())
    else:
        log.info("no --config given: built-in defaults and flags only")
    log.info(
        "root %s, address %s, daemon_mode %s, fs_driver %s, recover_policy %s",
        config.root,
        config.address,
        config.daemon_mode,
        config.daemon.fs_driver,
        config.daemon.recover_policy,
    )

    infos = list_plugins(pm)
    log.info("plugins loaded: %s", ", ".join(i.describe() for i in infos) or "none")
    for failed in pm.failed:
        log.error("plugin not loaded: %s", failed.error)
    log.info("backends installed: %s", ", ".join(sorted(pm.registry.backends)) or "none")
    if config.experimental.enable_stargz and "estargz" not in pm.registry.formats:
        log.warning("[experimental] enable_stargz is set but no installed plugin provides the estargz "
                    "format: eStargz layers are pulled as plain OCI layers; "
                    "pip install 'nydus-core[stargz]'")  # fmt: skip

    running = RunningSnapshotter.start(config, pm, liveness_interval=LIVENESS_INTERVAL)
    controller = _start_system_controller(config, running.images)
    try:
        log.info("ready")
        stop.wait()
        log.info("received %s, stopping", received[0] if received else "stop request")
        return 0
    finally:
        if controller is not None:
            controller.stop()
        running.stop()


def _start_system_controller(config: SnapshotterConfig, images: Any) -> Any:
    """Start the ``[system]`` API when enabled and there is a daemon manager to report on.

    A failure is logged and the snapshotter keeps serving: containerd needs the snapshots API,
    the system API is for operators.
    """
    if not config.system.enable:
        log.info("system controller disabled ([system] enable = false)")
        return None
    if images is None:
        log.warning("system controller not started: no daemon manager")
        return None
    from nydus_core.control.system import SystemController, SystemControllerError

    try:
        return SystemController(config.system.address, images, config.system.uid, config.system.gid).start()
    except SystemControllerError as exc:
        log.error("system controller not started: %s", exc)
        return None


def _replay_to_stderr(buffered: BufferedRecords) -> None:
    for record in buffered.records:
        if record.levelno >= logging.WARNING:
            print(f"{PROG}: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
