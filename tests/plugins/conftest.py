"""Fixtures of the plugin-manager tests: fake installed distributions with entry points."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MakeDist = Callable[[str, str, str], None]


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDist]:
    """Install fake distributions (dist-info + module) into a temp dir on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(dist: str, ep_name: str, source: str) -> None:
        module = f"nydus_test_{ep_name.replace('-', '_')}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[nydus_core.plugins]\n{ep_name} = {module}\n")
        modules.append(module)
        import importlib

        importlib.invalidate_caches()

    yield make
    for module in modules:
        sys.modules.pop(module, None)


