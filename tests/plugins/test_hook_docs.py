"""Every hook and record type is documented (docstring + a section in docs/hooks.md) and tested.

datasette's ``test_plugin_hooks_are_documented`` / ``test_plugin_hooks_have_tests`` are the model:
a hook nobody documents is a hook nobody can implement, and one nobody tests is a hook nobody
knows still works. The same holds for the records plugins yield and for every method of the
objects behind them (`Backend`, `ImageFormat`, `BlobDecoder`): they are the contract a backend
author writes against. Tests are found by reading the test files of the core and of every plugin
distribution (``def test_<hookname>``, ``def test_backend_<method>``, ``test_format_<method>``,
``test_decoder_<method>``, each optionally followed by ``_<more>``).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from nydus_core import hookspecs, records

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "hooks.md"

HOOKS = sorted(
    name
    for name, fn in vars(hookspecs).items()
    if callable(fn) and name.startswith("nydus_") and hasattr(fn, f"{hookspecs.PROJECT}_spec")
)
RECORD_TYPES = [
    "BackendRecord",
    "Capabilities",
    "BackendContext",
    "Backend",
    "FormatRecord",
    "FormatContext",
    "ImageFormat",
    "DecoderRecord",
    "BlobDecoder",
    "ConfigOption",
]
# class -> the prefix of its methods' test names
OBJECTS = {"Backend": "backend", "ImageFormat": "format", "BlobDecoder": "decoder"}
METHODS = sorted(
    (cls, name)
    for cls in OBJECTS
    for name, fn in vars(getattr(records, cls)).items()
    if callable(fn) and not name.startswith("_")
)


def _section(heading: str, level: str = "###") -> str:
    """The text of the section whose heading starts with `heading`, up to the next heading of
    the same or a higher level."""
    text = DOCS.read_text()
    stop = "#" * (len(level) - 1)
    match = re.search(
        rf"^{level} `{re.escape(heading)}(.*?)`\n(.*?)(?=^#{{2,{len(stop) + 1}}} |\Z)", text, re.M | re.S
    )
    return match.group(0) if match else ""


def _test_function_names() -> set[str]:
    names: set[str] = set()
    for tree in [REPO / "tests", *REPO.glob("plugins/*/tests")]:
        for path in tree.rglob("test_*.py"):
            names.update(re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", path.read_text(), re.M))
    return names


def _params(fn: object) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]  # type: ignore[arg-type]


def _heading_args(section: str) -> list[str]:
    match = re.match(r"#+ `[\w.]+\((.*?)\)`", section)
    assert match is not None, section[:80]
    return [a.strip() for a in match.group(1).split(",") if a.strip()]


def test_contract_found() -> None:
    # guards the discovery above: if the marker attribute changed, every test below would pass
    assert len(HOOKS) >= 11
    assert {"nydus_backends", "nydus_formats", "nydus_mounts"} <= set(HOOKS)
    assert len(METHODS) >= 25 and ("Backend", "attach") in METHODS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and len(doc) > 40, f"hookspec {hook} needs a docstring saying when it is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    section = _section(f"{hook}(")
    assert section, f"docs/hooks.md has no '### `{hook}(...)`' section"
    params = _params(getattr(hookspecs, hook))
    assert _heading_args(section) == params, f"the heading of {hook} in docs/hooks.md must list {params}"
    for param in params:
        assert f"`{param}`" in section, f"docs/hooks.md does not describe argument {param!r} of {hook}"


def test_docs_have_no_stale_hooks() -> None:
    documented = set(re.findall(r"^### `(nydus_\w+)\(", DOCS.read_text(), re.M))
    assert documented == set(HOOKS), f"documented but not a hookspec: {sorted(documented - set(HOOKS))}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    names = _test_function_names()
    assert any(n == f"test_{hook}" or n.startswith(f"test_{hook}_") for n in names), (
        f"no test function named test_{hook} under tests/ or plugins/*/tests/"
    )


@pytest.mark.parametrize("name", RECORD_TYPES)
def test_record_type_is_documented(name: str) -> None:
    cls = getattr(records, name)
    assert inspect.getdoc(cls), f"records.{name} needs a docstring"
    section = _section(f"{name}`\n", "###") or _section(name, "###")
    assert section, f"docs/hooks.md has no '### `{name}`' section"
    if attrs_fields := getattr(cls, "__attrs_attrs__", None):
        for field in attrs_fields:
            assert f"`{field.name}`" in section, f"docs/hooks.md does not describe {name}.{field.name}"


@pytest.mark.parametrize(("cls", "method"), METHODS)
def test_record_method_is_documented(cls: str, method: str) -> None:
    fn = getattr(getattr(records, cls), method)
    assert inspect.getdoc(fn), f"{cls}.{method} needs a docstring saying when it is called"
    section = _section(f"{cls}.{method}(", "####")
    assert section, f"docs/hooks.md has no '#### `{cls}.{method}(...)`' section"
    params = _params(fn)
    assert _heading_args(section) == params, f"the heading of {cls}.{method} must list {params}"
    for param in params:
        assert f"`{param}`" in section, (
            f"docs/hooks.md does not describe argument {param!r} of {cls}.{method}"
        )


def test_docs_have_no_stale_methods() -> None:
    documented = set(re.findall(r"^#### `(\w+)\.(\w+)\(", DOCS.read_text(), re.M))
    assert documented == set(METHODS), f"stale: {sorted(documented - set(METHODS))}"


@pytest.mark.parametrize(("cls", "method"), METHODS)
def test_record_method_has_a_test(cls: str, method: str) -> None:
    prefix = f"test_{OBJECTS[cls]}_{method}"
    names = _test_function_names()
    assert any(n == prefix or n.startswith(prefix + "_") for n in names), (
        f"no test function named {prefix} under tests/ or plugins/*/tests/"
    )
