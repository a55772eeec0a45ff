"""Starting and stopping a snapshotter: shared by ``containerd-nydus-grpc`` and the pytest plugin.

One place decides the order of start-up and shutdown, so what a plugin author's in-process test
sees (`nydus_core.testing`'s ``snapshotter`` fixture) is what the console script does:

start: daemon manager opened and recovered -> metastore opened (`Snapshotter`) -> socket
listening (``0660``) -> `nydus_snapshotter_started`;

stop: stop serving (in-flight calls get `STOP_GRACE`) -> `nydus_snapshotter_stopping` ->
metastore and daemon records closed. Daemons are never stopped here: running containers read
through them and the next start re-adopts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.server import RunningServer, serve
from nydus_core.control.snapshot.snapshotter import Snapshotter
from nydus_core.plugins import NydusPluginManager

log = logging.getLogger(__name__)

STOP_GRACE = 0.3  # seconds in-flight RPCs get on shutdown; the whole stop stays under one second

# Passed as `images` to mean "open the daemon manager" (the default).
AUTO = "auto"


class StartupError(Exception):
    """Start-up cannot continue (socket in use, cannot bind); the message is one clear line."""


class RunningSnapshotter:
    """A snapshotter serving on its socket: the `Snapshotter`, its server and its image service."""

    def __init__(
        self,
        config: SnapshotterConfig,
        pm: NydusPluginManager,
        snapshotter: Snapshotter,
        server: RunningServer,
        images: Any,
    ) -> None:
        self.config = config
        self.pm = pm
        self.snapshotter = snapshotter
        self.server = server
        self.images = images
        self.address = Path(config.address)
        self.stopped = False

    @classmethod
    def start(
        cls,
        config: SnapshotterConfig,
        pm: NydusPluginManager,
        *,
        images: Any = AUTO,
        log_rpcs: bool = True,
        liveness_interval: float | None = None,
    ) -> RunningSnapshotter:
        """Open everything and listen on ``config.address``.

        :param images: the image service: `AUTO` opens and recovers a `DaemonManager`, ``None``
            runs without one (plain OCI only), anything else is used as is (and not closed).
        :param log_rpcs: log every RPC at debug level (`nydus_core.cli.rpclog`).
        :param liveness_interval: seconds between daemon liveness sweeps of an opened daemon
            manager (dead daemons are handled per ``recover_policy``); ``None``: no sweeps.
        :raises StartupError: another process serves on the address, or it cannot be bound.
        """
        refuse_live_socket(Path(config.address))
        owned = images == AUTO
        if owned:
            images = open_image_service(config, pm)
        snapshotter: Snapshotter | None = None
        try:
            if log_rpcs:
                from nydus_core.cli.rpclog import LoggingSnapshotter

                snapshotter = LoggingSnapshotter(config.root, config, pm, images=images)
            else:
                snapshotter = Snapshotter(config.root, config, pm, images=images)
            log.info("metastore open: %s", config.root / "metadata.db")
            try:
                server = serve(snapshotter, config.address, config.uid, config.gid)
            except OSError as exc:
                raise StartupError(f"cannot listen on {config.address}: {exc}") from exc
        except BaseException:
            if snapshotter is not None:
                snapshotter.close()
            if owned and images is not None:
                images.close()
            raise
        running = cls(config, pm, snapshotter, server, images if owned else None)
        if owned and images is not None and liveness_interval:
            if hasattr(images, "start_liveness_monitor"):
                images.start_liveness_monitor(liveness_interval)
                log.info("daemon liveness checked every %gs", liveness_interval)
            else:
                log.warning("this daemon manager has no liveness monitor: dead daemons are found at restart")
        try:
            pm.typed.snapshotter_started(root=str(config.root), config=config)
        except Exception:
            # An event listener's bug must not take the socket away from containerd.
            log.exception("a nydus_snapshotter_started hook failed")
        return running

    def stop(self) -> None:
        """Stop serving, tell the plugins, close the databases. Idempotent; daemons keep running."""
        if self.stopped:
            return
        self.stopped = True
        self.server.stop(STOP_GRACE)
        log.info("stopped serving %s", self.address)
        try:
            self.pm.typed.snapshotter_stopping(root=str(self.config.root))
        except Exception:
            log.exception("a nydus_snapshotter_stopping hook failed")
        self.snapshotter.close()
        if self.images is not None:
            left = count_daemons(self.images)
            with contextlib.suppress(Exception):
                self.images.close()
            log.info("metastore closed; daemons left running: %d", left)
        else:
            log.info("metastore closed")


def refuse_live_socket(address: Path) -> None:
    """Fail if another process answers on `address` (serving would unlink its socket)."""
    if not os.path.exists(address):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(address))
        except OSError:
            return  # stale socket of a dead process: the server replaces it
    raise StartupError(f"cannot listen on {address}: another process is serving on it")


def open_image_service(config: SnapshotterConfig, pm: NydusPluginManager) -> Any:
    """The daemon manager, recovered; ``None`` when this build has none."""
    try:
        from nydus_core.control.daemons.manager import DaemonManager
    except ImportError as exc:
        log.warning("daemon manager not available (%s): lazily served images are disabled", exc)
        return None
    manager = DaemonManager(config, pm)
    try:
        manager.check_configuration()
        manager.recover()
    except BaseException:
        manager.close()
        raise
    log.info("daemon manager open: %d daemon(s) recovered", count_daemons(manager))
    return manager


def count_daemons(images: Any) -> int:
    try:
        return len(images.daemons()) if images is not None else 0
    except Exception:
        return 0
