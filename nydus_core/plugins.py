"""The plugin manager: built-ins first, then entry points, filtered by an allow/deny list.

Environment:

* ``NYDUS_CORE_PLUGINS_DENY`` – comma-separated plugin names never loaded;
* ``NYDUS_CORE_PLUGINS_ALLOW`` – if set, only these entry-point plugins are loaded;
* ``NYDUS_CORE_TRACE_HOOKS`` – ``1`` logs every hook call and result at debug level.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Mapping

import pluggy

from nydus_core import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nydus_core.plugins"

# Built-in behaviour, registered through the same hooks a third-party plugin uses.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "nydus_core.builtin.overlay_mounts",
)


def build_plugin_manager(
    plugins: Iterable[object] = (),
    *,
    entry_points: bool = True,
    builtins: bool = True,
    env: Mapping[str, str] | None = None,
) -> pluggy.PluginManager:
    """Create a plugin manager with every hookspec, the built-ins, entry points and `plugins`."""
    env = os.environ if env is None else env
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    deny = _names(env.get("NYDUS_CORE_PLUGINS_DENY", ""))
    allow = _names(env.get("NYDUS_CORE_PLUGINS_ALLOW", ""))
    if builtins:
        for modname in BUILTIN_PLUGINS:
            if modname not in deny:
                pm.register(importlib.import_module(modname), name=modname)
    if entry_points:
        for name in deny:
            pm.set_blocked(name)
        if allow:
            for ep_name in _entry_point_names():
                if ep_name not in allow:
                    pm.set_blocked(ep_name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    if env.get("NYDUS_CORE_TRACE_HOOKS", "") not in ("", "0"):
        pm.trace.root.setwriter(lambda msg: log.debug("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


def _names(value: str) -> set[str]:
    return {n.strip() for n in value.split(",") if n.strip()}


def _entry_point_names() -> list[str]:
    from importlib.metadata import entry_points

    return [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
