"""The plugin manager: built-ins first, then entry points, filtered by an allow/deny list; the
registries of named records; the one typed call path for hooks.

Registration order matters because pluggy calls implementations last-registered-first:

1. built-ins (`BUILTIN_PLUGINS`, registered under their module name) - the core's own behaviour,
   expressed through the public hooks, so every later plugin can override it;
2. entry points of group ``nydus_core.plugins`` (registered under the entry point's name);
3. the objects passed as ``plugins`` (tests, embedding code) - called first of all.

Then the record hooks (``nydus_backends``, ``nydus_formats``, ``nydus_decoders``,
``nydus_config_options``) are called once per plugin and their records collected into a
`Registry` (``pm.registry``): looked up by name, two records of one kind with one name are a
`PluginConflict` naming both plugins and their distributions (start-up stops).

Code that calls hooks goes through ``pm.typed`` (`TypedHooks`): one method per hook with the
spec's types, so mypy checks every call site; ``pm.hook`` is for pluggy itself and for tests.

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

A third-party plugin that cannot be imported or registered, or whose record hook raises, is
**logged as an error naming the entry point and its distribution, and skipped**: the snapshotter
serves every image containerd pulls, and its socket going away because one optional backend lost
a dependency would stop plain OCI images too (and leave running containers without their
snapshotter). The skip is visible in the log and in ``containerd-nydus-grpc --list-plugins``.
Built-ins and explicitly passed plugins are code, not configuration: their errors propagate.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import pluggy

from nydus_core import hookspecs
from nydus_core.errors import ConfigError, FailedPrecondition
from nydus_core.records import BackendRecord, ConfigOption, DecoderRecord, FormatRecord

if TYPE_CHECKING:
    from nydus_core.config import SnapshotterConfig
    from nydus_core.control.daemons.model import DaemonRecord
    from nydus_core.control.snapshot.model import Info, Mount, MountRequest
    from nydus_core.data.remote.credentials import Credentials

log = logging.getLogger(__name__)
trace_log = logging.getLogger(__name__ + ".trace")

ENTRY_POINT_GROUP = "nydus_core.plugins"
ENV_DENY = "NYDUS_CORE_PLUGINS_DENY"
ENV_ALLOW = "NYDUS_CORE_PLUGINS_ALLOW"
ENV_TRACE = "NYDUS_CORE_TRACE_HOOKS"
CORE_DISTRIBUTION = "nydus-core"

# Built-in behaviour, registered through the same hooks a third-party plugin uses.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "nydus_core.control.snapshot.overlay_mounts",
    "nydus_core.control.formats.nydus",
    "nydus_core.control.credentials.labels",
    "nydus_core.control.credentials.docker_config",
    "nydus_core.data.decoders",
)
# What a daemon process needs of them (its decoders): it must not import the control plane.
DAEMON_BUILTINS: tuple[str, ...] = ("nydus_core.data.decoders",)

# The upstream fs_driver values and the nydus-core extra whose plugin serves each, for the error a
# user sees when the backend is not installed (nydus_core.config keeps upstream's default).
BACKEND_EXTRAS: dict[str, str] = {
    "fusedev": "fuse",
    "fscache": "erofs",
    "blockdev": "erofs",
    "proxy": "virtiofs",
}

BUILTIN = "builtin"
ENTRY_POINT = "entry point"
EXPLICIT = "explicit"


@attrs.frozen
class PluginInfo:
    """One registered plugin, as ``--list-plugins`` and the log describe it."""

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

    def provider(self) -> str:
        """``plugin X (distribution D V)``: who provides a record, for conflict messages."""
        if not self.distribution:
            return f"plugin {self.name} ({self.origin})"
        dist = f"distribution {self.distribution} {self.version or ''}".rstrip()
        return f"plugin {self.name} ({dist})"


@attrs.frozen
class FailedPlugin:
    """An entry point that was skipped because it could not be loaded."""

    name: str
    distribution: str | None
    error: str


@attrs.frozen
class SkippedPlugin:
    """An installed entry point that the allow/deny list kept out (never imported)."""

    name: str
    distribution: str | None
    version: str | None
    reason: str


class PluginConflict(ConfigError):
    """Two plugins provide a record of one kind under one name; start-up cannot choose."""


class NoBackendError(FailedPrecondition, ConfigError):
    """No installed plugin provides the backend an image or the configuration names (a gRPC
    ``FailedPrecondition`` when a Prepare needs it, a configuration error at start-up)."""


R = TypeVar("R", BackendRecord, FormatRecord, DecoderRecord, ConfigOption)


@attrs.frozen
class Registered(Generic[R]):
    """A record and the plugin that yielded it."""

    record: R
    plugin: PluginInfo


def install_hint(name: str) -> str:
    """How a user gets the backend `name` (the pip extra of nydus-core that provides it)."""
    extra = BACKEND_EXTRAS.get(name)
    if extra is None:
        return "install the plugin distribution that provides it"
    return f"pip install 'nydus-core[{extra}]'"


class Registry:
    """The records of every registered plugin, by kind and name (built by `build_registry`)."""

    def __init__(self) -> None:
        self.backends: dict[str, Registered[BackendRecord]] = {}
        self.formats: dict[str, Registered[FormatRecord]] = {}
        self.decoders: dict[str, Registered[DecoderRecord]] = {}
        self.options: dict[str, Registered[ConfigOption]] = {}

    def backend(self, name: str) -> BackendRecord | None:
        found = self.backends.get(name)
        return None if found is None else found.record

    def require_backend(self, name: str, why: str = "") -> BackendRecord:
        """The backend `name`, or `NoBackendError` listing the installed ones and the extra."""
        found = self.backend(name)
        if found is not None:
            return found
        installed = ", ".join(sorted(self.backends)) or "none"
        reason = f" ({why})" if why else ""
        raise NoBackendError(
            f"fs_driver {name!r}{reason}: no installed plugin provides this backend (installed "
            f"backends: {installed}); {install_hint(name)}"
        )

    def ordered_formats(self, config: SnapshotterConfig | None = None) -> list[FormatRecord]:
        """Formats to ask, highest priority first (ties by name); only the enabled ones when
        `config` is given."""
        records = sorted((r.record for r in self.formats.values()), key=lambda f: (-f.priority, f.name))
        if config is None:
            return records
        return [f for f in records if f.format.enabled(config)]

    def ordered_decoders(self) -> list[DecoderRecord]:
        return sorted((r.record for r in self.decoders.values()), key=lambda d: (-d.priority, d.name))

    def config_options(self) -> list[ConfigOption]:
        return [r.record for r in self.options.values()]

    def entries(self) -> list[tuple[str, str, PluginInfo, Any]]:
        """``(kind, name, plugin, record)`` of every record, for listings."""
        rows: list[tuple[str, str, PluginInfo, Any]] = []
        tables: tuple[tuple[str, Mapping[str, Registered[Any]]], ...] = (
            ("backend", self.backends),
            ("format", self.formats),
            ("decoder", self.decoders),
            ("option", self.options),
        )
        for kind, table in tables:
            rows += [(kind, name, reg.plugin, reg.record) for name, reg in sorted(table.items())]
        return rows


# Record hook -> (registry attribute, kind word for messages, record type).
_RECORD_HOOKS: dict[str, tuple[str, str, type]] = {
    "nydus_backends": ("backends", "backend", BackendRecord),
    "nydus_formats": ("formats", "format", FormatRecord),
    "nydus_decoders": ("decoders", "decoder", DecoderRecord),
    "nydus_config_options": ("options", "config option", ConfigOption),
}


class NydusPluginManager(pluggy.PluginManager):
    """A `pluggy.PluginManager` with every nydus-core hookspec, which remembers where each
    plugin came from (for ``--list-plugins`` and error messages), which entry points failed or
    were kept out, and the `Registry` of their records."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginInfo] = {}
        self.failed: list[FailedPlugin] = []
        self.skipped: list[SkippedPlugin] = []
        self.typed = TypedHooks(self)
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        """The records of the registered plugins (built on first use; see `build_registry`)."""
        if self._registry is None:
            self._registry = build_registry(self)
        return self._registry

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
            hookspec (a typo such as ``nydus_backend``); the plugin is not left registered.
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
        self._registry = None
        return registered

    def info(self, name: str) -> PluginInfo:
        return self.origins.get(name, PluginInfo(name=name, origin=EXPLICIT))


def build_registry(pm: NydusPluginManager, kinds: Sequence[str] | None = None) -> Registry:
    """Call every record hook once per plugin and index the records by kind and name.

    :raises PluginConflict: two plugins yield a record of one kind with one name (the message
        names both plugins and their distributions), or a record hook of a built-in or explicit
        plugin returned something that is not its record type. A failing entry-point plugin is
        unregistered, logged and listed in ``pm.failed`` instead.
    """
    registry = Registry()
    for hook_name, (attr, kind, record_type) in _RECORD_HOOKS.items():
        if kinds is not None and attr not in kinds:
            continue
        table: dict[str, Registered[Any]] = getattr(registry, attr)
        caller = getattr(pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # registration order
            info = pm.info(impl.plugin_name)
            try:
                records = list(impl.function() or ())
                for record in records:
                    if not isinstance(record, record_type):
                        raise TypeError(
                            f"{hook_name} yielded {type(record).__name__}, not {record_type.__name__}"
                        )
            except Exception as exc:
                if info.origin != ENTRY_POINT:
                    raise
                error = f"{info.provider()}: {hook_name} failed: {type(exc).__name__}: {exc}"
                log.error("plugin skipped: %s", error)
                pm.failed.append(FailedPlugin(info.name, info.distribution, error))
                pm.unregister(name=impl.plugin_name)
                return build_registry(pm, kinds)
            for record in records:
                name = record.name
                if name in table:
                    first = table[name].plugin
                    raise PluginConflict(
                        f"{kind} {name!r} is provided by two plugins: {first.provider()} and "
                        f"{info.provider()}; uninstall one, or keep one out with {ENV_DENY}"
                    )
                table[name] = Registered(record, info)
    return registry


class TypedHooks:
    """One typed method per hook (tox 4 style): the call path of every hook in nydus-core.

    ``pm.typed.mounts(request=..., config=...)`` is ``pm.hook.nydus_mounts(...)`` with the
    argument and return types of `nydus_core.hookspecs`; `tests/plugins` checks that every
    hookspec has its method with the same parameters and that production code calls hooks only
    through here. The record hooks are called by `build_registry`; their methods here return
    the flattened records (for tests and tools).
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._hook = pm.hook

    # records
    def formats(self) -> list[FormatRecord]:
        return [r for rs in self._hook.nydus_formats() for r in rs]

    def backends(self) -> list[BackendRecord]:
        return [r for rs in self._hook.nydus_backends() for r in rs]

    def decoders(self) -> list[DecoderRecord]:
        return [r for rs in self._hook.nydus_decoders() for r in rs]

    def config_options(self) -> list[ConfigOption]:
        return [r for rs in self._hook.nydus_config_options() for r in rs]

    # mount production
    def mounts(self, *, request: MountRequest, config: SnapshotterConfig) -> list[Mount] | None:
        return self._hook.nydus_mounts(request=request, config=config)

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
    builtins: bool | Sequence[str] = True,
    env: Mapping[str, str] | None = None,
    registry: bool = True,
) -> NydusPluginManager:
    """Create a plugin manager with every hookspec, the built-ins, entry points and `plugins`.

    :param plugins: extra plugin objects (modules, instances), registered last so they are
        called first.
    :param entry_points: load the ``nydus_core.plugins`` entry points (tests turn this off to
        stay independent of what is installed).
    :param builtins: register `BUILTIN_PLUGINS` (or only the modules named, e.g. `DAEMON_BUILTINS`).
    :param env: the environment to read the allow/deny/trace variables from.
    :param registry: build the `Registry` now, so that a `PluginConflict` is raised here (at
        start-up) rather than at first use.
    """
    env = os.environ if env is None else env
    pm = NydusPluginManager()
    deny = _names(env.get(ENV_DENY, ""))
    allow = _names(env.get(ENV_ALLOW, ""))
    builtin_names = {m for m in BUILTIN_PLUGINS} | {m.rsplit(".", 1)[-1] for m in BUILTIN_PLUGINS}

    chosen = BUILTIN_PLUGINS if builtins is True else tuple(builtins or ())
    if chosen:
        for modname in chosen:
            if modname in deny or modname.rsplit(".", 1)[-1] in deny:
                log.info("built-in plugin %s not loaded (%s)", modname, ENV_DENY)
                pm.skipped.append(SkippedPlugin(modname, CORE_DISTRIBUTION, None, f"denied by {ENV_DENY}"))
                continue
            pm.register_with_origin(importlib.import_module(modname), modname, BUILTIN,
                                    distribution=CORE_DISTRIBUTION, version=_core_version())  # fmt: skip

    seen_entry_points: set[str] = set()
    if entry_points:
        for ep in _entry_points():
            seen_entry_points.add(ep.name)
            dist, version = (ep.dist.name, ep.dist.version) if ep.dist is not None else (None, None)
            if ep.name in deny:
                log.info("plugin %s not loaded (%s)", ep.name, ENV_DENY)
                pm.skipped.append(SkippedPlugin(ep.name, dist, version, f"denied by {ENV_DENY}"))
            elif allow and ep.name not in allow:
                log.info("plugin %s not loaded (not in %s)", ep.name, ENV_ALLOW)
                pm.skipped.append(SkippedPlugin(ep.name, dist, version, f"not in {ENV_ALLOW}"))
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
    if registry:
        pm.registry  # noqa: B018 - built now: a conflict stops start-up here
    return pm


def _core_version() -> str:
    import nydus_core

    return nydus_core.__version__


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


def listing(pm: NydusPluginManager) -> list[str]:
    """``--list-plugins``: a header, then one line per installed plugin record -- kind, name,
    distribution, version, details -- then plugins without records (``other``), entry points
    kept out by the allow/deny list (``denied``) and entry points that failed to load.

    Config options are listed at the end, not as lines of their own.
    """
    rows: list[tuple[str, str, str, str, str]] = [("KIND", "NAME", "DISTRIBUTION", "VERSION", "DETAILS")]
    with_records: set[str] = set()
    for kind, name, info, record in pm.registry.entries():
        with_records.add(info.name)
        if kind == "option":
            continue
        if kind == "backend":
            note = f"capabilities {','.join(record.capabilities.names()) or '-'}"
        else:
            note = f"priority {record.priority}"
        if record.description:
            note += f"; {record.description}"
        rows.append((kind, name, info.distribution or "-", info.version or "-", note))
    for info in list_plugins(pm):
        if info.name not in with_records:
            hooks = ", ".join(h.removeprefix("nydus_") for h in info.hooks) or "no hooks"
            rows.append(("other", info.name, info.distribution or "-", info.version or "-",
                         f"hooks: {hooks}"))  # fmt: skip
    for skipped in pm.skipped:
        rows.append(("denied", skipped.name, skipped.distribution or "-", skipped.version or "-",
                     skipped.reason))  # fmt: skip
    for failed in pm.failed:
        rows.append(("failed", failed.name, failed.distribution or "-", "-", failed.error))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]  # fmt: skip
    options = sorted(o.dotted for o in pm.registry.config_options())
    if options:
        lines.append(f"config options registered by plugins: {', '.join(options)}")
    return lines


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
