"""``nydusd-py --supervisor P --id X``: a daemon whose FUSE session survives it (failover, upgrade).

First start (the mountpoint is not a live FUSE mount): mount by hand, keep the INIT, serve, and on
``PUT /api/v1/daemon/fuse/sendfd`` push the state (mounts, paths, INIT bytes) plus the ``/dev/fuse``
fd to the supervisor at P; after that every mount change is pushed again by itself, so the
supervisor never holds a stale image list.

Takeover (a live FUSE mount at the mountpoint -- its daemon died, the supervisor kept it alive --
or ``--upgrade``): stay in INIT without touching the mountpoint (an unserved FUSE mount blocks every
access); ``PUT /api/v1/daemon/fuse/takeover`` fetches state and fd (state READY, images re-opened
with their old slots, so inode numbers are the same); ``PUT /api/v1/daemon/start`` serves the
session, replaying the INIT and sending ``FUSE_NOTIFY_RESEND`` so requests in flight at the death
are re-issued. ``failover_policy`` ``resend`` and ``flush`` both resend: the image is read-only,
so every request is idempotent, and not resending leaves the callers of in-flight requests
blocked for ever (unkillable once signalled) -- there is no kernel operation that fails them.

A request that kills every daemon is caught by the in-flight journal (journal.py): after three
deaths in a row with it in flight, it is answered EIO and the rest of the mount is served.

``PUT /api/v1/daemon/exit`` ends the daemon without unmounting (the old side of a hot upgrade).
SIGTERM unmounts, as an unsupervised daemon does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
from typing import Any

from nydus_core.data.runtime.state import STATE_READY, STATE_RUNNING, ApiError, DaemonRuntime
from nydus_fuse.daemon.journal import Journal, judge
from nydus_fuse.daemon.session import ReplaySession, fuse_mounted, init_info, mount_fuse, unmount
from nydus_fuse.supervisor import SupervisorError, fetch_state, peek_state, send_state

log = logging.getLogger("nydusd-py")


LOAD_WAIT = 30.0
START_WAIT = 2.0  # `start` answers once the session is served (so the caller needs no polling)
CRASH_ENV = "NYDUSD_PY_CRASH_ON_READ"  # fault injection for tests: an image path whose read kills us


class Control:
    """The session actions behind the API endpoints, and what they share with the main thread.

    Created (and its actions registered) before the API socket exists, so a caller that sees
    INIT can always ask for a takeover; the takeover waits until the image is loaded.
    """

    def __init__(self, args: argparse.Namespace, runtime: DaemonRuntime) -> None:
        self.args = args
        self.runtime = runtime
        self.mountpoint = os.path.abspath(args.mountpoint)
        self.loaded = threading.Event()  # the command line's image is open, the mode decided
        self.takeover_mode = False
        self.lock = threading.Lock()
        self.fuse_fd = -1
        self.init = b""
        self.taken = threading.Event()
        self.preloaded: set[str] = set()  # images a standby opened before its takeover
        self.started = threading.Event()
        self.running = threading.Event()
        self.leave_mounted = False
        self.push_on_change = False
        self.trio_token: Any = None
        runtime.actions.update(takeover=self.takeover, start=self.start, sendfd=self.sendfd, exit=self.exit)
        runtime.info_extra["takeover_ready"] = False  # True once `loaded` (a warm standby)

    # -- takeover side ----------------------------------------------------------------------
    def takeover(self) -> None:
        if not self.loaded.wait(LOAD_WAIT):
            raise ApiError(503, "EBUSY", "still loading the image")
        if not self.takeover_mode:
            raise ApiError(400, "EINVAL", "this daemon mounted a new session; there is nothing to take over")
        with self.lock:
            if self.taken.is_set():
                raise ApiError(409, "EEXIST", "the session was already taken over")
            try:
                state, fd = fetch_state(self.args.supervisor)
            except SupervisorError as e:
                raise ApiError(503, "EIO", str(e)) from e
            try:
                if os.path.abspath(str(state.get("mountpoint", ""))) != self.mountpoint:
                    raise ApiError(400, "EINVAL", f"supervisor state is for {state.get('mountpoint')!r}, "
                                                  f"not {self.mountpoint}")  # fmt: skip
                self._match_images(state.get("mounts", []))
                self.init = bytes.fromhex(state["fuse_init"])
            except BaseException:
                os.close(fd)
                raise
            self.fuse_fd = fd
            self.runtime.state = STATE_READY
            self.runtime.info_extra["takeover_ready"] = False
            self.taken.set()
            log.info(
                "took over the FUSE session of %s (%d image(s), INIT %s)",
                self.mountpoint,
                len(state.get("mounts", [])),
                init_info(self.init),
            )

    def preload(self) -> None:
        """A shared standby opens the images the supervisor's state names now, with their slots,
        so that the takeover finds them open (opening costs tens of milliseconds each)."""
        try:
            state = peek_state(self.args.supervisor)
        except SupervisorError as e:
            log.info("no state to preload images from (%s)", e)
            return
        for m in state.get("mounts", []):
            try:
                if m["id"]:
                    self.runtime.add(m["id"], m["source"], m["config"], slot=int(m["slot"]), prefetch=False)
                    self.preloaded.add(m["id"])
            except (ApiError, KeyError, TypeError, ValueError) as e:
                log.warning("cannot preload image %r: %s", m.get("id"), e)

    def _match_images(self, mounts: list[dict[str, Any]]) -> None:
        """Make the open images exactly the state's: preloaded ones that were detached since (or
        got another slot or source) are closed, missing ones opened with their slots."""
        wanted = {m["id"]: m for m in mounts if m["id"]}
        current = {m["id"]: m for m in self.runtime.mounts_state() if m["id"]}
        for mid, have in current.items():
            want = wanted.get(mid)
            if want is None or (want["source"], want["config"], int(want["slot"])) != (
                have["source"], have["config"], int(have["slot"])
            ):
                self.runtime.remove(mid)
                self.preloaded.discard(mid)
        for mid, m in wanted.items():
            if mid not in self.runtime.instances:
                self.runtime.add(mid, m["source"], m["config"], slot=int(m["slot"]))
        for mid in self.preloaded:  # what the dead daemon was prefetching goes on here
            inst = self.runtime.instances.get(mid)
            if inst is not None:
                inst.start_prefetch()
        self.preloaded.clear()

    def start(self) -> None:
        """Serve the taken-over session; answers once RUNNING (or after `START_WAIT`), so the
        caller's first state query already sees it: one round trip less on the failover path."""
        if not self.taken.is_set():
            raise ApiError(400, "EINVAL", "start needs a takeover first")
        self.started.set()
        self.running.wait(START_WAIT)

    # -- running side -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "id": self.args.id,
            "mountpoint": self.mountpoint,
            "bootstrap": self.args.bootstrap,
            "config": self.args.config,
            "mounts": self.runtime.mounts_state(),
            "fuse_init": self.init.hex(),
            "version": self.runtime.version.get("package_ver", ""),
        }

    def sendfd(self) -> None:
        with self.lock:
            if self.fuse_fd < 0:
                raise ApiError(400, "EINVAL", "no FUSE session yet")
            try:
                send_state(self.args.supervisor, self.state(), self.fuse_fd)
            except SupervisorError as e:
                raise ApiError(503, "EIO", str(e)) from e
            self.push_on_change = True
        log.info("state and FUSE fd sent to supervisor %s", self.args.supervisor)

    def on_change(self, _mount_id: str, _inst: object) -> None:
        if self.push_on_change:
            try:
                self.sendfd()
            except ApiError as e:
                log.error("cannot push state to the supervisor after a mount change: %s", e.message)

    def exit(self) -> None:
        """Stop serving but leave the mount (and the session, which the supervisor holds)."""
        import pyfuse3
        import trio

        self.leave_mounted = True
        token = self.trio_token
        if token is None:
            raise ApiError(400, "EINVAL", "not serving")

        def later() -> None:  # after the 204 went out
            trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)

        # Short: a hot upgrade's readers wait from here until the next daemon starts (and the
        # caller copes with a lost 204: the process is leaving either way).
        threading.Timer(0.005, later).start()


def serve_supervised(args: argparse.Namespace, runtime: DaemonRuntime, ctl: Control) -> int:
    mountpoint = ctl.mountpoint
    if args.bootstrap is not None:
        try:
            with open(args.config) as f:
                runtime.add("", args.bootstrap, f.read())
        except (OSError, ApiError) as e:
            log.error("cannot open image %s: %s", args.bootstrap, e)
            return 1
    import pyfuse3
    import trio

    from nydus_fuse.daemon.fs import NydusFS
    from nydus_fuse.daemon.main import MAX_READ, _set_readahead

    takeover = ctl.takeover_mode = bool(args.upgrade) or fuse_mounted(mountpoint)
    # Everything that does not depend on the session is ready before a takeover is asked for
    # (a warm standby waits below): the pause of a failover is only what follows `start`.
    fs = NydusFS(runtime, threads=args.thread_num)
    stem = os.path.splitext(args.supervisor)[0]
    counts = fs.counts_path = stem + ".poison.json"
    try:
        fs.journal = Journal(stem + ".inflight")
    except OSError as e:
        log.error("no in-flight journal (%s): a request that crashes the daemon would loop", e)
        fs.journal = None
    if takeover and args.bootstrap is None:
        # A shared daemon's images are not on its command line: open those the supervisor's
        # state names now, and build what opening one more needs (the registry client's HTTP
        # stack and TLS roots, ~100 ms), so that neither falls inside the failover pause.
        # Before `loaded`: a takeover waits for this instead of racing it.
        import nydus_core.data.remote.backend  # noqa: F401
        from nydus_core.data.remote.registry import warm_up

        warm_up()
        ctl.preload()
    ctl.loaded.set()
    runtime.info_extra["takeover_ready"] = takeover
    if takeover:
        log.info("live FUSE mount at %s: INIT, waiting for takeover and start", mountpoint)
        ctl.started.wait()
    else:
        try:
            os.makedirs(mountpoint, exist_ok=True)
            ctl.fuse_fd, ctl.init = mount_fuse(mountpoint)
        except OSError as e:
            log.error("cannot mount FUSE at %s: %s", mountpoint, e)
            return 1
    runtime.listeners.append(ctl.on_change)
    if fs.journal is not None:
        try:
            if takeover:  # read only now: the journal holds what the dead daemon had in flight
                fs.poisoned, fs.suspects = judge(fs.journal, counts)
            else:  # a new session: nothing is in flight, nothing has crashed yet
                fs.journal.clear()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(counts)
        except OSError as e:
            log.error("in-flight journal (%s): a request that crashes the daemon would loop", e)
            fs.journal = None
    crash_path = os.environ.get(CRASH_ENV)
    if crash_path and args.bootstrap is not None:
        fs.crash_ino = fs.ino_of_path(crash_path)
        log.warning("fault injection: reading %s (inode %d) kills this daemon", crash_path, fs.crash_ino)
    session = ReplaySession(ctl.fuse_fd, ctl.init, resend=takeover)
    fs.init_hook = session.on_init
    try:
        pyfuse3.init(fs, session.device_path, set())
    except RuntimeError as e:
        log.error("cannot start the FUSE session at %s: %s", mountpoint, e)
        return 1

    def after_init() -> None:
        os.stat(mountpoint)
        _set_readahead(mountpoint, MAX_READ // 1024)

    async def serve() -> None:
        ctl.trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for sig in signals:
                        log.info("signal %d: unmounting %s", sig, mountpoint)
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            if not takeover:  # a takeover inherits the bdi setting with the mount
                nursery.start_soon(trio.to_thread.run_sync, after_init)
            runtime.state = STATE_RUNNING
            ctl.running.set()
            log.info("RUNNING at %s (%s)", mountpoint, "takeover" if takeover else "new session")
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        ctl.trio_token = None
        pyfuse3.close(unmount=False)
        session.close()
        if ctl.leave_mounted:
            log.info("exit: leaving %s mounted for the next daemon", mountpoint)
        else:
            try:
                unmount(mountpoint)
            except OSError as e:
                log.error("cannot unmount %s: %s", mountpoint, e)
    return 0
