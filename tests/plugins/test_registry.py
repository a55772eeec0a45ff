"""The registries of named records: what the record hooks yield, found by name, conflicts refused.

Entry points are real (fake installed distributions, `conftest.make_dist`), so a conflict names the
distributions exactly as a user's two installed packages would be named.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from conftest import MakeDist

from nydus_core import hookimpl
from nydus_core.config import load_config
from nydus_core.data.decoders import NATIVE, DecoderSet
from nydus_core.data.rafs.bootstrap import BlobEntry
from nydus_core.errors import ConfigError
from nydus_core.plugins import (
    ENV_DENY,
    NoBackendError,
    PluginConflict,
    build_plugin_manager,
    build_registry,
    listing,
)
from nydus_core.records import (
    Backend,
    BackendRecord,
    BlobDecoder,
    Capabilities,
    ConfigOption,
    DecoderRecord,
    FormatRecord,
    ImageFormat,
)
from nydus_core.testing.services import snapshotter_executable

BACKEND_PLUGIN = """
from nydus_core import hookimpl
from nydus_core.records import Backend, BackendRecord, Capabilities

@hookimpl
def nydus_backends():
    yield BackendRecord(name="{name}", backend=Backend(), capabilities=Capabilities(daemon=False))
"""


def test_nydus_backends(make_dist: MakeDist) -> None:
    """Backends are looked up by name and know the distribution that provides them."""
    make_dist("acme-backend", "acme", BACKEND_PLUGIN.format(name="acme-fs"))
    pm = build_plugin_manager(env={})
    found = pm.registry.backends["acme-fs"]
    assert (found.plugin.name, found.plugin.distribution, found.plugin.version) == (
        "acme",
        "acme-backend",
        "1.2.3",
    )
    assert pm.registry.require_backend("acme-fs").capabilities.daemon is False
    with pytest.raises(NoBackendError) as exc:
        pm.registry.require_backend("fscache", "configured")
    assert "acme-fs" in str(exc.value) and "pip install 'nydus-core[erofs]'" in str(exc.value)
    assert exc.value.grpc_status == "FAILED_PRECONDITION"  # a Prepare needing it fails cleanly


def test_two_plugins_claiming_one_backend_name(make_dist: MakeDist) -> None:
    make_dist("acme-backend", "acme", BACKEND_PLUGIN.format(name="shared-name"))
    make_dist("other-backend", "other", BACKEND_PLUGIN.format(name="shared-name"))
    with pytest.raises(PluginConflict) as exc:
        build_plugin_manager(env={})
    msg = str(exc.value)
    assert "backend 'shared-name' is provided by two plugins" in msg
    assert "distribution acme-backend 1.2.3" in msg and "distribution other-backend 1.2.3" in msg
    assert ENV_DENY in msg
    # keeping one out solves it
    pm = build_plugin_manager(env={ENV_DENY: "other"})
    assert pm.registry.backends["shared-name"].plugin.distribution == "acme-backend"


def test_conflict_stops_the_snapshotter_naming_both(make_dist: MakeDist, tmp_path: Path) -> None:
    """The same, as a user meets it: ``containerd-nydus-grpc`` refuses to start (and
    ``--list-plugins`` says why), naming both distributions; the installed fuse plugin's
    ``fusedev`` is what the impostor claims."""
    make_dist("impostor-fuse", "impostor", BACKEND_PLUGIN.format(name="fusedev"))
    import os
    import sys

    site = next(p for p in sys.path if p.endswith("/site"))
    env = {**os.environ, "PYTHONPATH": site}
    for args in (["--root", str(tmp_path / "r"), "--address", str(tmp_path / "s.sock")], ["--list-plugins"]):
        out = subprocess.run(
            [snapshotter_executable(), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert "plugin conflict: backend 'fusedev' is provided by two plugins" in out.stderr
        assert "distribution nydus-fuse" in out.stderr and "distribution impostor-fuse 1.2.3" in out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_failing_record_hook_skips_that_plugin(
    make_dist: MakeDist, caplog: pytest.LogCaptureFixture
) -> None:
    make_dist(
        "broken-backend",
        "broken",
        """
from nydus_core import hookimpl

@hookimpl
def nydus_backends():
    raise RuntimeError("no kernel module")
""",
    )
    make_dist("acme-backend", "acme", BACKEND_PLUGIN.format(name="acme-fs"))
    with caplog.at_level(logging.ERROR):
        pm = build_plugin_manager(env={})
    assert "acme-fs" in pm.registry.backends and pm.get_plugin("broken") is None
    (failed,) = pm.failed
    assert failed.distribution == "broken-backend" and "no kernel module" in failed.error
    assert any("plugin skipped" in r.getMessage() for r in caplog.records)
    rows = [line.split(None, 4) for line in listing(pm)]
    assert ["failed", "broken", "broken-backend", "-"] in [r[:4] for r in rows]


def test_records_of_the_wrong_type_are_refused() -> None:
    class Wrong:
        @hookimpl
        def nydus_formats(self) -> list[object]:
            return [BackendRecord(name="x", backend=Backend())]

    with pytest.raises(TypeError, match="nydus_formats yielded BackendRecord, not FormatRecord"):
        build_plugin_manager([Wrong()], entry_points=False, env={})
    with pytest.raises(ValueError, match="record name 'Not A Name'"):
        BackendRecord(name="Not A Name", backend=Backend())


def test_nydus_formats_order_and_conflicts() -> None:
    class Formats:
        def __init__(self, *records: FormatRecord) -> None:
            self.records = records

        @hookimpl
        def nydus_formats(self) -> list[FormatRecord]:
            return list(self.records)

    low = FormatRecord(name="low", format=ImageFormat(), priority=-5)
    high = FormatRecord(name="high", format=ImageFormat(), priority=500)
    pm = build_plugin_manager([Formats(low, high)], entry_points=False, env={})
    assert [f.name for f in pm.registry.ordered_formats()] == ["high", "nydus", "low"]
    with pytest.raises(PluginConflict, match="format 'nydus' is provided by two plugins"):
        build_plugin_manager(
            [Formats(FormatRecord(name="nydus", format=ImageFormat()))], entry_points=False, env={}
        )


class XorBlobs(BlobDecoder):
    def accepts(self, blob: BlobEntry) -> bool:
        return blob.blob_id.startswith("x")


def test_nydus_decoders() -> None:
    """Decoders are picked per blob, highest priority first among those that accept it; the
    native one takes the rest; a daemon builds only the decoder table."""

    class Plugin:
        @hookimpl
        def nydus_decoders(self) -> list[DecoderRecord]:
            return [DecoderRecord(name="xor", decoder=XorBlobs(), priority=10)]

        @hookimpl
        def nydus_backends(self) -> list[BackendRecord]:
            raise AssertionError("a daemon must not build backends")

    pm = build_plugin_manager(
        [Plugin()], entry_points=False, builtins=("nydus_core.data.decoders",), registry=False
    )
    registry = build_registry(pm, kinds=("decoders",))
    assert [d.name for d in registry.ordered_decoders()] == ["xor", NATIVE]
    decoders = DecoderSet(registry.ordered_decoders())
    assert isinstance(decoders.for_blob(BlobEntry(blob_id="x1")), XorBlobs)
    assert type(decoders.for_blob(BlobEntry(blob_id="a1"))).__name__ == "NativeDecoder"
    empty = DecoderSet([DecoderRecord(name="xor", decoder=XorBlobs())])
    with pytest.raises(Exception, match="blob a1: no installed decoder reads it"):
        empty.for_blob(BlobEntry(blob_id="a1"))


def test_nydus_config_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plugin's key is parsed with the configuration (not warned about) once the plugin is
    installed; two plugins registering one key conflict."""
    option = ConfigOption("daemon", "warm_spares", int, 0, "daemons started ahead of need")

    class Plugin:
        @hookimpl
        def nydus_config_options(self) -> list[ConfigOption]:
            return [option]

    pm = build_plugin_manager([Plugin()], entry_points=False, env={})
    path = tmp_path / "config.toml"
    path.write_text("version = 1\n[daemon]\nwarm_spares = 3\n")
    with caplog.at_level(logging.WARNING):
        config = load_config(path, pm.registry.config_options())
    assert option.get(config) == 3 and not caplog.records
    path.write_text('version = 1\n[daemon]\nwarm_spares = "3"\n')
    with pytest.raises(ConfigError, match=r"daemon\.warm_spares: expected an integer"):
        load_config(path, pm.registry.config_options())
    with pytest.raises(PluginConflict, match=r"option .daemon\.warm_spares. is provided by two plugins"):
        build_plugin_manager([Plugin(), Plugin()], entry_points=False, env={})
    assert "config options registered by plugins: daemon.warm_spares" in listing(pm)[-1]


def test_capabilities_listing() -> None:
    assert Capabilities().names() == ["daemon", "dedicated_daemon"]
    assert Capabilities(daemon=False, shared_daemon=True).names() == ["no_daemon"]
