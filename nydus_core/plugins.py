"""The plugin manager: built-ins first, then entry points, filtered by an allow/deny list.

Registration order matters because pluggy calls implementations last-registered-first:

1. built-ins (`BUILTIN_PLUGINS`, registered under their module name) - the core's own behaviour,
   expressed through the public hooks, so every later plugin can override it;
2. entry points of group ``nydus_core.plugins`` (registered under the entry point's name);
3. the objects passed as ``plugins`` (tests, embedding code) - called first of all.

Environment (read from ``env``, `os.environ` by default):

* ``NYDUS_CORE_PLUGINS_DENY`` - comma-separated names never loaded: entry-point names, or
  built-ins by module name (``nydus_core.control.snapshot.overlay_mounts``) or short name
  (``overlay_mounts``);
* ``NYDUS_CORE_PLUGINS_ALLOW`` - if set, only entry points with these names are loaded. Built-ins
  are the core itself and are not filtered by it (switch one off with the deny list): an allow
  list naming only a third-party backend must not silently drop the overlay mount producer;
* ``NYDUS_CORE_TRACE_HOOKS=1`` - every hook call, the plugins it reaches and its result are
  logged (logger ``nydus_core.plugins.trace``, level INFO since the operator asked for it),
  with label values that look like secrets hidden.

A third-party plugin that cannot be imported or registered is **logged as an error naming the
entry point and its distribution, and skipped**: the snapshotter serves every image containerd
pulls, and its socket going away because one optional backend lost a dependency would stop
plain OCI images too (and leave running containers without their snapshotter). The skip is
visible in the log and in ``containerd-nydus-grpc --version``. Built-ins and explicitly passed
plugins are code, not configuration: their errors propagate.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from nydus_core import hookspecs

if TYPE_CHECKING:
    from nydus_core.config import SnapshotterConfig
    from nydus_core.control.daemons.model import DaemonRecord, Instance
    from nydus_core.control.snapshot.model import (
        ChainEntry,
        ImageSource,
        Info,
        Layer,
        LayerClaim,
        Mount,
        MountRequest,
    )
    from nydus_core.data.remote.credentials import Credentials

log = logging.getLogger(__name__)
trace_log = logging.getLogger(__name__ + ".trace")

ENTRY_POINT_GROUP = "nydus_core.plugins"
ENV_DENY = "NYDUS_CORE_PLUGINS_DENY"
ENV_ALLOW = "NYDUS_CORE_PLUGINS_ALLOW"
ENV_TRACE = "NYDUS_CORE_TRACE_HOOKS"

# Built-in behaviour, registered through the same hooks a third-party plugin uses.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "nydus_core.control.snapshot.overlay_mounts",
    "nydus_core.control.formats.nydus",
    "nydus_core.builtin.nydusd",
    "nydus_core.builtin.nydusd_upgrade",
    "nydus_core.control.credentials.labels",
    "nydus_core.control.credentials.docker_config",
)

BUILTIN = "builtin"
ENTRY_POINT = "entry point"
EXPLICIT = "explicit"


@attrs.frozen
class PluginInfo:
    """One registered plugin, as ``--version`` and the log describe it."""

    name: str
    origin: str  # BUILTIN, ENTRY_POINT or EXPLICIT
    distribution: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()

    def describe(self) -> str:
        where = self.origin
        if self.distribution:
            where += f", {self.distribution} {self.version or ''}".rstrip()
        return f"{self.name} ({where})"


@attrs.frozen
class FailedPlugin:
    """An entry point that was skipped because it could not be loaded."""

    name: str
    distribution: str | None
    error: str


class NydusPluginManager(pluggy.PluginManager):
    """A `pluggy.PluginManager` with every nydus-core hookspec, which remembers where each
    plugin came from (for ``--version`` and error messages) and which entry points failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginInfo] = {}
        self.failed: list[FailedPlugin] = []
        self.typed = TypedHooks(self)

    def register_with_origin(
        self,
        plugin: object,
        name: str | None,
        origin: str,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> str:
        """Register `plugin`, check every hookimpl names a known hook, and record its origin.

        :raises pluggy.PluginValidationError: a hookimpl has wrong arguments or no matching
            hookspec (a typo such as ``nydus_claim_layers``); the plugin is not left registered.
        """
        registered = self.register(plugin, name=name)
        if registered is None:  # blocked
            return ""
        unknown = [
            caller.name
            for caller in self.get_hookcallers(plugin) or ()
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        ]
        if unknown:
            self.unregister(plugin)
            raise pluggy.PluginValidationError(
                plugin,
                f"plugin {registered!r} implements unknown hook(s) {', '.join(sorted(unknown))}; "
                f"the hooks are listed in nydus_core.hookspecs",
            )
        self.origins[registered] = PluginInfo(
            name=registered, origin=origin, distribution=distribution, version=version
        )
        return registered


class TypedHooks:
    """One typed method per hook (tox 4 style), so call sites are checked by mypy.

    ``pm.typed.claim_layer(layer=..., config=...)`` is ``pm.hook.nydus_claim_layer(...)`` with the
    argument and return types of `nydus_core.hookspecs`; `tests/plugins` checks that every
    hookspec has its method with the same parameters.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    # image detection
    def claim_layer(self, *, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        return self._hook.nydus_claim_layer(layer=layer, config=config)

    def find_image(
        self, *, key: str, chain: Sequence[ChainEntry], config: SnapshotterConfig
    ) -> ImageSource | None:
        return self._hook.nydus_find_image(key=key, chain=chain, config=config)

    # mount production
    def mounts(self, *, request: MountRequest, config: SnapshotterConfig) -> list[Mount] | None:
        return self._hook.nydus_mounts(request=request, config=config)

    # daemon lifecycle
    def daemon_start(
        self, *, daemon: DaemonRecord, instance: Instance | None, config: SnapshotterConfig
    ) -> int | None:
        return self._hook.nydus_daemon_start(daemon=daemon, instance=instance, config=config)

    def daemon_wait_ready(self, *, daemon: DaemonRecord, timeout: float) -> bool | None:
        return self._hook.nydus_daemon_wait_ready(daemon=daemon, timeout=timeout)

    def instance_attach(self, *, daemon: DaemonRecord, instance: Instance) -> bool | None:
        return self._hook.nydus_instance_attach(daemon=daemon, instance=instance)

    def instance_detach(self, *, daemon: DaemonRecord, instance: Instance) -> bool | None:
        return self._hook.nydus_instance_detach(daemon=daemon, instance=instance)

    def daemon_alive(self, *, daemon: DaemonRecord) -> bool | None:
        return self._hook.nydus_daemon_alive(daemon=daemon)

    def daemon_reconcile(self, *, daemon: DaemonRecord) -> bool | None:
        return self._hook.nydus_daemon_reconcile(daemon=daemon)

    def daemon_stop(self, *, daemon: DaemonRecord) -> bool | None:
        return self._hook.nydus_daemon_stop(daemon=daemon)

    def daemon_recover(
        self, *, daemon: DaemonRecord, instances: Sequence[Instance], config: SnapshotterConfig
    ) -> bool | None:
        return self._hook.nydus_daemon_recover(daemon=daemon, instances=instances, config=config)

    def daemon_upgrade(
        self,
        *,
        daemon: DaemonRecord,
        instances: Sequence[Instance],
        program: str,
        version: str,
        config: SnapshotterConfig,
    ) -> bool | None:
        return self._hook.nydus_daemon_upgrade(
            daemon=daemon, instances=instances, program=program, version=version, config=config
        )

    # events
    def snapshotter_started(self, *, root: str, config: SnapshotterConfig) -> None:
        self._hook.nydus_snapshotter_started(root=root, config=config)

    def snapshotter_stopping(self, *, root: str) -> None:
        self._hook.nydus_snapshotter_stopping(root=root)

    def snapshot_committed(self, *, info: Info, remote: bool) -> None:
        self._hook.nydus_snapshot_committed(info=info, remote=remote)

    def snapshot_removed(self, *, info: Info) -> None:
        self._hook.nydus_snapshot_removed(info=info)

    def daemon_event(self, *, daemon: DaemonRecord, event: str, detail: Mapping[str, Any]) -> None:
        self._hook.nydus_daemon_event(daemon=daemon, event=event, detail=detail)

    # credentials
    def credentials(self, *, host: str, ref: str, labels: Mapping[str, str]) -> Credentials | None:
        return self._hook.nydus_credentials(host=host, ref=ref, labels=labels)


def build_plugin_manager(
    plugins: Iterable[object] = (),
    *,
    entry_points: bool = True,
    builtins: bool = True,
    env: Mapping[str, str] | None = None,
) -> NydusPluginManager:
    """Create a plugin manager with every hookspec, the built-ins, entry points and `plugins`.

    :param plugins: extra plugin objects (modules, instances), registered last so they are
        called first.
    :param entry_points: load the ``nydus_core.plugins`` entry points (tests turn this off to
        stay independent of what is installed).
    :param builtins: register `BUILTIN_PLUGINS`.
    :param env: the environment to read the allow/deny/trace variables from.
    """
    env = os.environ if env is None else env
    pm = NydusPluginManager()
    deny = _names(env.get(ENV_DENY, ""))
    allow = _names(env.get(ENV_ALLOW, ""))
    builtin_names = {m for m in BUILTIN_PLUGINS} | {m.rsplit(".", 1)[-1] for m in BUILTIN_PLUGINS}

    if builtins:
        for modname in BUILTIN_PLUGINS:
            if modname in deny or modname.rsplit(".", 1)[-1] in deny:
                log.info("built-in plugin %s not loaded (%s)", modname, ENV_DENY)
                continue
            pm.register_with_origin(importlib.import_module(modname), modname, BUILTIN)

    seen_entry_points: set[str] = set()
    if entry_points:
        for ep in _entry_points():
            seen_entry_points.add(ep.name)
            if ep.name in deny:
                log.info("plugin %s not loaded (%s)", ep.name, ENV_DENY)
            elif allow and ep.name not in allow:
                log.info("plugin %s not loaded (not in %s)", ep.name, ENV_ALLOW)
            else:
                _load_entry_point(pm, ep)
        for var, names in ((ENV_DENY, deny), (ENV_ALLOW, allow)):
            for name in sorted(names - seen_entry_points - builtin_names):
                log.warning("%s names %r, but no such plugin is installed", var, name)

    for plugin in plugins:
        pm.register_with_origin(plugin, None, EXPLICIT)

    pm.check_pending()
    if env.get(ENV_TRACE, "") not in ("", "0"):
        enable_hook_tracing(pm)
    return pm


def _names(value: str) -> set[str]:
    return {n.strip() for n in value.split(",") if n.strip()}


def _entry_points() -> Sequence[EntryPoint]:
    # Sorted so that the registration order (hence the call order) does not depend on how the
    # file system lists installed distributions.
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _load_entry_point(pm: NydusPluginManager, ep: EntryPoint) -> None:
    dist = ep.dist.name if ep.dist is not None else None
    version = ep.dist.version if ep.dist is not None else None
    where = f"entry point {ep.name!r} ({ep.value}) of distribution {dist or '<unknown>'}"
    if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
        error = f"{where}: a plugin named {ep.name!r} is already registered"
        log.error("plugin skipped: %s", error)
        pm.failed.append(FailedPlugin(ep.name, dist, error))
        return
    try:
        plugin = ep.load()
        pm.register_with_origin(plugin, ep.name, ENTRY_POINT, distribution=dist, version=version)
    except Exception as exc:
        error = f"{where}: {type(exc).__name__}: {exc}"
        log.error("plugin skipped, it could not be loaded: %s", error)
        pm.failed.append(FailedPlugin(ep.name, dist, error))
        return
    log.info("plugin %s loaded from %s %s", ep.name, dist, version)


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin in registration order, with its origin and the hooks it implements."""
    origins = pm.origins if isinstance(pm, NydusPluginManager) else {}
    result = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = tuple(sorted(c.name for c in pm.get_hookcallers(plugin) or ()))
        info = origins.get(name, PluginInfo(name=name, origin=EXPLICIT))
        result.append(attrs.evolve(info, hooks=hooks))
    return result


# --------------------------------------------------------------------------------------------
# Hook tracing
# --------------------------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"secret|passw|token|auth|credential", re.IGNORECASE)
_QUOTED_PAIR = re.compile(r"""(['"])([^'"]*)\1: (['"])(?:(?!\3).)*\3""")
_MAX_REPR = 400


def redact(value: Any) -> str:
    """A short repr of a hook argument or result, with secret-looking mapping values hidden.

    Labels may carry pull secrets (``containerd.io/snapshot/pullsecret``); `Credentials` hides
    its own secret. Long reprs are cut: the trace is for following the flow, not for data.
    """

    def hide(match: re.Match[str]) -> str:
        if _SECRET_KEY.search(match.group(2)):
            return f"{match.group(1)}{match.group(2)}{match.group(1)}: '<hidden>'"
        return match.group(0)

    text = _QUOTED_PAIR.sub(hide, repr(value))
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def enable_hook_tracing(pm: pluggy.PluginManager) -> None:
    """Log every hook call: its arguments, the plugins it reaches, and its outcome."""

    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        args = ", ".join(f"{k}={redact(v)}" for k, v in kwargs.items())
        plugins = ", ".join(impl.plugin_name for impl in reversed(impls))
        trace_log.info("call %s(%s) -> plugins [%s]", hook_name, args, plugins)

    def after(
        outcome: pluggy.Result[Any],
        hook_name: str,
        _impls: Sequence[pluggy.HookImpl],
        _kwargs: Mapping[str, Any],
    ) -> None:
        if outcome.exception is not None:
            exc = outcome.exception
            trace_log.info("return %s raised %s: %s", hook_name, type(exc).__name__, exc)
        else:
            trace_log.info("return %s = %s", hook_name, redact(outcome.get_result()))

    pm.add_hookcall_monitoring(before, after)
