"""`build_plugin_manager`: order, allow/deny lists, broken plugins, tracing, `list_plugins`.

Entry points are real: each test writes a tiny distribution's ``*.dist-info`` (metadata plus
``entry_points.txt``) and its module into a temp directory put on ``sys.path``, which is exactly
what ``pip install`` leaves behind, so `importlib.metadata` finds them the ordinary way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pluggy
import pytest
from conftest import MakeDist

from nydus_core import hookimpl
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import Kind, Mount, MountRequest
from nydus_core.data.remote.credentials import Credentials
from nydus_core.plugins import (
    BUILTIN,
    BUILTIN_PLUGINS,
    ENTRY_POINT,
    EXPLICIT,
    NydusPluginManager,
    build_plugin_manager,
    list_plugins,
    redact,
)

GOOD_PLUGIN = """
from nydus_core import hookimpl

@hookimpl
def nydus_snapshotter_stopping(root):
    return None
"""


def request(tmp_path: Path) -> MountRequest:
    return MountRequest(
        id="1",
        key="k",
        kind=Kind.ACTIVE,
        upper=tmp_path / "fs",
        work=tmp_path / "work",
        lowers=(),
        labels={},
    )


def test_builtins_registered_first(make_dist: MakeDist) -> None:
    make_dist("nydus-good", "good", GOOD_PLUGIN)

    class Explicit:
        @hookimpl
        def nydus_snapshotter_stopping(self, root: str) -> None:
            return None

    pm = build_plugin_manager([Explicit()], env={})
    infos = list_plugins(pm)
    names = [i.name for i in infos]
    assert names[: len(BUILTIN_PLUGINS)] == list(BUILTIN_PLUGINS)
    assert names.index("good") < len(names) - 1  # the explicit one comes last
    by_name = {i.name: i for i in infos}
    assert by_name["nydus_core.control.snapshot.overlay_mounts"].origin == BUILTIN
    assert by_name["nydus_core.control.snapshot.overlay_mounts"].hooks == ("nydus_mounts",)
    assert by_name["good"].origin == ENTRY_POINT
    assert by_name["good"].distribution == "nydus-good"
    assert by_name["good"].version == "1.2.3"
    assert by_name["good"].describe() == "good (entry point, nydus-good 1.2.3)"
    assert infos[-1].origin == EXPLICIT
    assert infos[-1].hooks == ("nydus_snapshotter_stopping",)


def test_entry_point_overrides_builtin(make_dist: MakeDist, tmp_path: Path) -> None:
    make_dist(
        "nydus-kata",
        "kata",
        """
        from nydus_core import hookimpl
        from nydus_core.control.snapshot.model import Mount

        @hookimpl
        def nydus_mounts(request, config):
            return [Mount(type="kata", source="x")]
        """,
    )
    pm = build_plugin_manager(env={})
    mounts = pm.hook.nydus_mounts(request=request(tmp_path), config=SnapshotterConfig())
    assert mounts == [Mount(type="kata", source="x")]


def test_no_entry_points(make_dist: MakeDist) -> None:
    make_dist("nydus-good", "good", GOOD_PLUGIN)
    pm = build_plugin_manager(entry_points=False, env={})
    assert pm.get_plugin("good") is None
    assert [i.name for i in list_plugins(pm)] == list(BUILTIN_PLUGINS)


def test_no_builtins() -> None:
    pm = build_plugin_manager(entry_points=False, builtins=False, env={})
    assert list_plugins(pm) == []


def test_deny_entry_point(make_dist: MakeDist, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nydus_core.plugins")
    make_dist("nydus-good", "good", GOOD_PLUGIN)
    make_dist("nydus-other", "other", GOOD_PLUGIN)
    pm = build_plugin_manager(env={"NYDUS_CORE_PLUGINS_DENY": "good, nonexistent"})
    assert pm.get_plugin("good") is None
    assert pm.get_plugin("other") is not None
    assert "plugin good not loaded (NYDUS_CORE_PLUGINS_DENY)" in caplog.text
    # a typo in the list is worth a warning
    assert "NYDUS_CORE_PLUGINS_DENY names 'nonexistent', but no such plugin is installed" in caplog.text


@pytest.mark.parametrize("name", ["overlay_mounts", "nydus_core.control.snapshot.overlay_mounts"])
def test_deny_builtin(name: str, tmp_path: Path) -> None:
    pm = build_plugin_manager(entry_points=False, env={"NYDUS_CORE_PLUGINS_DENY": name})
    names = [i.name for i in list_plugins(pm)]
    assert names == [m for m in BUILTIN_PLUGINS if m != "nydus_core.control.snapshot.overlay_mounts"]
    assert pm.hook.nydus_mounts(request=request(tmp_path), config=SnapshotterConfig()) is None


def test_allow_list(make_dist: MakeDist) -> None:
    make_dist("nydus-good", "good", GOOD_PLUGIN)
    make_dist("nydus-other", "other", GOOD_PLUGIN)
    pm = build_plugin_manager(env={"NYDUS_CORE_PLUGINS_ALLOW": "other"})
    assert pm.get_plugin("good") is None
    assert pm.get_plugin("other") is not None
    # built-ins are the core and stay
    assert pm.get_plugin(BUILTIN_PLUGINS[0]) is not None


def test_deny_wins_over_allow(make_dist: MakeDist) -> None:
    make_dist("nydus-good", "good", GOOD_PLUGIN)
    pm = build_plugin_manager(env={"NYDUS_CORE_PLUGINS_ALLOW": "good", "NYDUS_CORE_PLUGINS_DENY": "good"})
    assert pm.get_plugin("good") is None


def test_import_error_is_logged_and_skipped(make_dist: MakeDist, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nydus_core.plugins")
    make_dist("nydus-broken", "broken", "import does_not_exist_anywhere\n")
    make_dist("nydus-good", "good", GOOD_PLUGIN)
    pm = build_plugin_manager(env={})
    assert pm.get_plugin("broken") is None
    assert pm.get_plugin("good") is not None
    [failed] = pm.failed
    assert failed.name == "broken"
    assert failed.distribution == "nydus-broken"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "entry point 'broken'" in errors[0]
    assert "distribution nydus-broken" in errors[0]
    assert "does_not_exist_anywhere" in errors[0]


def test_unknown_hook_name_is_skipped(make_dist: MakeDist, caplog: pytest.LogCaptureFixture) -> None:
    make_dist(
        "nydus-typo",
        "typo",
        """
        from nydus_core import hookimpl

        @hookimpl
        def nydus_claim_layers(layer, config):
            return None
        """,
    )
    pm = build_plugin_manager(env={})
    assert pm.get_plugin("typo") is None
    assert "unknown hook(s) nydus_claim_layers" in caplog.text
    assert "distribution nydus-typo" in caplog.text


def test_wrong_hook_arguments_are_skipped(make_dist: MakeDist, caplog: pytest.LogCaptureFixture) -> None:
    make_dist(
        "nydus-badargs",
        "badargs",
        """
        from nydus_core import hookimpl

        @hookimpl
        def nydus_snapshotter_stopping(root, extra_argument):
            return None
        """,
    )
    pm = build_plugin_manager(env={})
    assert pm.get_plugin("badargs") is None
    assert "extra_argument" in caplog.text


def test_explicit_plugin_errors_propagate() -> None:
    class Typo:
        @hookimpl
        def nydus_snapshoter_started(self, root: str) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError, match="nydus_snapshoter_started"):
        build_plugin_manager([Typo()], entry_points=False, env={})


def test_optionalhook_for_future_hooks_is_accepted() -> None:
    class Future:
        @hookimpl(optionalhook=True)
        def nydus_some_future_hook(self) -> None:
            return None

    pm = build_plugin_manager([Future()], entry_points=False, env={})
    assert len(list_plugins(pm)) == len(BUILTIN_PLUGINS) + 1


def test_returns_a_pluggy_manager() -> None:
    pm = build_plugin_manager(entry_points=False, env={})
    assert isinstance(pm, NydusPluginManager)
    assert isinstance(pm, pluggy.PluginManager)
    # every hookspec is known
    from nydus_core import hookspecs

    spec_names = {n for n in dir(hookspecs) if n.startswith("nydus_")}
    assert spec_names <= {n for n in dir(pm.hook) if n.startswith("nydus_")}


def test_trace_hooks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nydus_core.plugins.trace")

    class Creds:
        @hookimpl
        def nydus_credentials(self, host: str, ref: str, labels: dict[str, str]) -> Credentials:
            return Credentials("alice", "hunter2-password")

    pm = build_plugin_manager([Creds()], entry_points=False, env={"NYDUS_CORE_TRACE_HOOKS": "1"})
    labels = {"containerd.io/snapshot/pullsecret": "s3cr3t-value", "containerd.io/snapshot.ref": "sha256:1"}
    creds = pm.hook.nydus_credentials(host="r.example", ref="r.example/a:b", labels=labels)
    assert creds.secret == "hunter2-password"
    text = caplog.text
    assert "call nydus_credentials(" in text
    assert "r.example/a:b" in text
    assert "sha256:1" in text
    assert "return nydus_credentials = Credentials(username='alice', secret=<hidden>)" in text
    assert "s3cr3t-value" not in text
    assert "hunter2-password" not in text


def test_no_trace_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pm = build_plugin_manager(entry_points=False, env={"NYDUS_CORE_TRACE_HOOKS": "0"})
    pm.hook.nydus_snapshotter_stopping(root="/x")
    assert "nydus_snapshotter_stopping" not in caplog.text


def test_redact() -> None:
    assert redact({"a": "1", "auth-token": "zzz"}) == "{'a': '1', 'auth-token': '<hidden>'}"
    assert redact({"Password": "p"}) == "{'Password': '<hidden>'}"
    assert len(redact("x" * 5000)) == 400


def _spec_params(hook: str) -> list[str]:
    import inspect

    from nydus_core import hookspecs

    return list(inspect.signature(getattr(hookspecs, hook)).parameters)


def _hook_names() -> list[str]:
    from nydus_core import hookspecs

    return sorted(
        n
        for n in dir(hookspecs)
        if n.startswith("nydus_") and hasattr(getattr(hookspecs, n), "nydus_core_spec")
    )


@pytest.mark.parametrize("hook", _hook_names())
def test_typed_hooks_cover_every_hookspec(hook: str) -> None:
    """`pm.typed.<name>` exists for every hook, with the spec's parameters, and calls through."""
    import inspect
    import types

    calls: list[tuple[str, dict[str, object]]] = []

    from nydus_core import hookspecs

    record_hook = not _spec_params(hook)  # nydus_backends, ...: yield records, no arguments

    def record(*args: object) -> object:
        calls.append((hook, dict(zip(_spec_params(hook), args, strict=True))))
        return [f"record of {hook}"] if record_hook else f"answer of {hook}"

    # pluggy reads the argument names from the code object, so the implementation is compiled
    # with exactly the spec's parameter names.
    params_src = ", ".join(_spec_params(hook))
    namespace: dict[str, object] = {"record": record}
    exec(f"def impl({params_src}):\n    return record({params_src})\n", namespace)
    impl = namespace["impl"]
    plugin = types.ModuleType("recorder")
    plugin.impl = hookimpl(specname=hook)(impl)  # type: ignore[attr-defined,type-var]
    pm = build_plugin_manager([plugin], entry_points=False, builtins=False, env={}, registry=False)

    method = getattr(pm.typed, hook.removeprefix("nydus_"))
    params = [p for p in inspect.signature(method).parameters]
    assert params == _spec_params(hook)
    args = {p: f"value of {p}" for p in params}
    result = method(**args)
    assert calls == [(hook, args)]
    firstresult = getattr(hookspecs, hook).nydus_core_spec["firstresult"]
    if record_hook:
        assert result == [f"record of {hook}"]  # flattened over plugins
    else:
        assert result == (f"answer of {hook}" if firstresult else None)


REPO = Path(__file__).resolve().parents[2]
PRODUCTION_TREES = ["nydus_core", *(str(p) for p in REPO.glob("plugins/*/nydus_*"))]


def test_production_code_calls_hooks_only_through_typed() -> None:
    """One call path: ``pm.typed.<hook>(...)`` (checked by mypy), never ``pm.hook.nydus_*``."""
    import re

    repo = Path(__file__).resolve().parents[2]
    offenders = []
    for tree in PRODUCTION_TREES:
        base = Path(tree) if Path(tree).is_absolute() else repo / tree
        for path in base.rglob("*.py"):
            if path.name == "plugins.py" and path.parent.name == "nydus_core":
                continue  # TypedHooks and the registry builder are the call path
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.hook\.nydus_\w+\(", line):
                    offenders.append(f"{path.relative_to(repo)}:{n}: {line.strip()}")
    assert len(PRODUCTION_TREES) >= 2, "the plugin trees were not found"
    assert offenders == []
