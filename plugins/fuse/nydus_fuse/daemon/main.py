"""``nydusd-py``: upstream nydusd's command line, serving RAFS over FUSE.

``nydusd-py fuse --mountpoint M --apisock S [--config C --bootstrap B] ...``: with a bootstrap the
daemon is dedicated to that image (mounted at M); without, it is shared and images are attached
under ``M/<id>`` by ``POST /api/v1/mount``. The API answers from the start (state INIT) and says
RUNNING once the FUSE session is up. SIGTERM/SIGINT unmount cleanly. ``nydusd-py spare`` is a
process started ahead of need that becomes such a daemon when handed its command line (spare.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from nydus_core.data import decoders
from nydus_core.data.runtime import __version__
from nydus_core.data.runtime.api import ApiServer
from nydus_core.data.runtime.state import STATE_RUNNING, ApiError, DaemonRuntime, git_commit

log = logging.getLogger("nydusd-py")

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}  # fmt: skip
MAX_READ = 1 << 20


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nydusd-py", description="RAFS (nydus) image daemon over FUSE")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fuse", help="serve RAFS images through a FUSE mount")
    f.add_argument("--mountpoint", required=True)
    f.add_argument("--apisock", required=True)
    f.add_argument("--config")
    f.add_argument("--bootstrap")
    f.add_argument("--log-level", default="info", choices=sorted(LEVELS))
    f.add_argument("--log-file")
    f.add_argument("--log-rotation-size", type=int, default=0)
    f.add_argument("--thread-num", type=int, default=4)
    f.add_argument("--id", default="")
    f.add_argument("--supervisor")
    f.add_argument("--failover-policy", choices=["none", "resend", "flush"], default="none")
    f.add_argument("--prefetch-files")
    f.add_argument("--upgrade", action="store_true")
    f.add_argument("--backend-source")
    args = p.parse_args(argv)
    if (args.config is None) != (args.bootstrap is None):
        p.error("--config and --bootstrap go together (dedicated mode); give neither for shared mode")
    if args.upgrade and not args.supervisor:
        p.error("--upgrade (take over a running daemon's session) needs --supervisor")
    if args.supervisor and not args.id:
        p.error("--supervisor needs --id")
    return args


def version_text() -> str:
    return (f"Version: \tnydusd-py {__version__}\nGit Commit: \t{git_commit()}\nBuild Time: \t\n"
            f"Profile: \trelease\nRustc: \t\n")  # fmt: skip


def setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def _set_readahead(mountpoint: str, kib: int) -> None:
    """Let the kernel send 1 MiB requests: raise the mount's bdi read_ahead_kb (best effort).

    The bdi is named by the mount's device number in mountinfo (a FUSE mount's st_dev is the
    same, but mountinfo needs no request to ourselves).
    """
    target = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [fl[2] for fl in (line.split() for line in f) if len(fl) > 4 and fl[4] == target]
        if not devs:
            raise OSError(f"{target} is not in mountinfo")
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as bdi:
            bdi.write(str(kib))
        log.debug("read_ahead_kb of %s (bdi %s) set to %d", target, devs[-1], kib)
    except OSError as e:
        log.debug("cannot set read_ahead_kb for %s: %s", mountpoint, e)


def _read_prefetch_list(path: str | None) -> list[str]:
    if not path:
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        sys.stdout.write(version_text())
        return 0
    if argv and argv[0] == "spare":  # started ahead of need; becomes a daemon (spare.py)
        from nydus_fuse.daemon.spare import run

        return run(argv[1:])
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    log.info("starting: %s", " ".join(argv))
    try:
        prefetch = _read_prefetch_list(args.prefetch_files)
    except OSError as e:
        log.error("--prefetch-files %s: %s", args.prefetch_files, e)
        return 1
    # The installed decoders (plugin manager, entry points) are found while the API and FUSE start.
    runtime = DaemonRuntime(args.id, shared=args.bootstrap is None, prefetch_files=prefetch,
                            decoders=decoders.installed_soon())  # fmt: skip
    control = None
    if args.supervisor:  # before the API answers: a caller that sees INIT may ask for a takeover
        from nydus_fuse.daemon.supervised import Control

        control = Control(args, runtime)
    try:
        api = ApiServer(args.apisock, runtime)
    except OSError as e:
        log.error("cannot listen on %s: %s", args.apisock, e)
        return 1
    api.start()
    try:
        if control is not None:
            from nydus_fuse.daemon.supervised import serve_supervised

            return serve_supervised(args, runtime, control)
        return _serve(args, runtime)
    finally:
        api.stop()
        runtime.close()
        log.info("exited")


def _serve(args: argparse.Namespace, runtime: DaemonRuntime) -> int:
    image = None
    if args.bootstrap is not None:
        try:
            with open(args.config) as f:
                config_text = f.read()
            # Prefetch starts once the mount is up (below): started here, its threads would
            # compete for the interpreter with the FUSE mount that Prepare is waiting for.
            image = runtime.add("", args.bootstrap, config_text, prefetch=False)
        except (OSError, ApiError) as e:
            log.error("cannot open image %s: %s", args.bootstrap, e)
            return 1
    # Imported here: `--version` and argument errors stay fast and need no FUSE libraries.
    import pyfuse3
    import trio

    from nydus_fuse.daemon.fs import NydusFS

    fs = NydusFS(runtime, threads=args.thread_num)
    try:
        os.makedirs(args.mountpoint, exist_ok=True)
    except OSError as e:  # e.g. ENOTCONN: a dead daemon's mount is still there
        log.error("mountpoint %s is unusable: %s", args.mountpoint, e)
        return 1
    # No "max_read=" option: pyfuse3's init() leaves conn.max_read at 0 and libfuse then refuses
    # the mismatch. Requests still reach 1 MiB: libfuse negotiates max_pages=256 and the bdi
    # readahead is raised to 1 MiB below.
    options = {"fsname=nydusfs", "subtype=nydus", "ro", "allow_other", "default_permissions"}
    try:
        pyfuse3.init(fs, args.mountpoint, options)
    except RuntimeError as e:
        log.error("cannot mount FUSE at %s: %s", args.mountpoint, e)
        return 1

    def after_init() -> None:
        # The kernel lowers the bdi readahead to the INIT reply's max_readahead, so raise it
        # only once INIT is done: stat() returns after INIT and our first GETATTR.
        os.stat(args.mountpoint)
        _set_readahead(args.mountpoint, MAX_READ // 1024)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for sig in signals:
                        log.info("signal %d: unmounting %s", sig, args.mountpoint)
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            nursery.start_soon(trio.to_thread.run_sync, after_init)
            runtime.state = STATE_RUNNING
            log.info("RUNNING at %s", args.mountpoint)
            if image is not None:
                image.start_prefetch()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
