"""Every hook is documented (docstring + a section in docs/hooks.md) and has a test named after it.

datasette's ``test_plugin_hooks_are_documented`` / ``test_plugin_hooks_have_tests`` are the model:
a hook nobody documents is a hook nobody can implement, and one nobody tests is a hook nobody
knows still works. Tests are found by reading the test files (``def test_<hookname>`` or
``def test_<hookname>_<more>``), so the convention holds across every engineer's test tree.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from nydus_core import hookspecs

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "hooks.md"

HOOKS = sorted(
    name
    for name, fn in vars(hookspecs).items()
    if callable(fn) and name.startswith("nydus_") and hasattr(fn, f"{hookspecs.PROJECT}_spec")
)


def _section(name: str) -> str:
    """The text of the ``### `name(...)` `` section of docs/hooks.md, up to the next heading."""
    text = DOCS.read_text()
    match = re.search(rf"^### `{name}\((.*?)\)`\n(.*?)(?=^#{{2,3}} |\Z)", text, re.M | re.S)
    return match.group(0) if match else ""


def _test_function_names() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        names.update(re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)\s*\(", path.read_text(), re.M))
    return names


def test_hookspecs_found() -> None:
    # guards the discovery above: if the marker attribute changed, every test below would pass
    assert len(HOOKS) >= 16
    assert "nydus_claim_layer" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and len(doc) > 40, f"hookspec {hook} needs a docstring saying when it is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    section = _section(hook)
    assert section, f"docs/hooks.md has no '### `{hook}(...)`' section"
    params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    heading_args = re.match(rf"### `{hook}\((.*?)\)`", section)
    assert heading_args is not None
    assert [a.strip() for a in heading_args.group(1).split(",") if a.strip()] == params, (
        f"the heading of {hook} in docs/hooks.md must list its arguments {params}"
    )
    for param in params:
        assert f"`{param}`" in section, f"docs/hooks.md does not describe argument {param!r} of {hook}"


def test_docs_have_no_stale_hooks() -> None:
    documented = set(re.findall(r"^### `(nydus_\w+)\(", DOCS.read_text(), re.M))
    assert documented == set(HOOKS), f"documented but not a hookspec: {sorted(documented - set(HOOKS))}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    names = _test_function_names()
    assert any(n == f"test_{hook}" or n.startswith(f"test_{hook}_") for n in names), (
        f"no test function named test_{hook} under tests/"
    )
