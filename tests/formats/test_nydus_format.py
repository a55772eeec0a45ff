"""The built-in ``nydus`` format record: which layers are claimed, and where the image of a container is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest

from nydus_core import hookimpl
from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.formats import nydus as nydus_format
from nydus_core.control.snapshot.model import ChainEntry, Layer, LayerClaim
from nydus_core.errors import FailedPrecondition
from nydus_core.plugins import build_plugin_manager
from nydus_core.records import FormatRecord, ImageFormat

CONFIG = SnapshotterConfig()
NYDUS = nydus_format.NydusFormat()
REF = "127.0.0.1:5000/nydus/busybox:latest"


def layer(tmp_path: Path, labels: dict[str, str]) -> Layer:
    return Layer(
        key="extract-1 sha256:abc", parent="", target="sha256:abc",
        labels={L.TARGET_SNAPSHOT_REF: "sha256:abc", **labels}, snapshot_id="5", upper=tmp_path,
    )  # fmt: skip


def entry(tmp_path: Path, sid: str, labels: dict[str, str], boot: str | None = None) -> ChainEntry:
    upper = tmp_path / sid / "fs"
    upper.mkdir(parents=True)
    if boot is not None:
        (upper / boot).parent.mkdir(parents=True, exist_ok=True)
        (upper / boot).write_bytes(b"bootstrap")
    return ChainEntry(id=sid, name=f"sha256:{sid}", labels=labels, upper=upper)


def test_format_claim_layer_nydus_blob(tmp_path: Path) -> None:
    claim = NYDUS.claim_layer(layer(tmp_path, {L.NYDUS_BLOB: "true"}), CONFIG)
    assert claim == LayerClaim(format="nydus")
    # through the plugin manager's registry, with every built-in registered
    pm = build_plugin_manager(entry_points=False, env={})
    record = pm.registry.ordered_formats(CONFIG)[0]
    assert record.format.claim_layer(layer(tmp_path, {L.NYDUS_BLOB: ""}), CONFIG) == claim


def test_format_claim_layer_bootstrap_is_unpacked(tmp_path: Path) -> None:
    assert NYDUS.claim_layer(layer(tmp_path, {L.NYDUS_BOOTSTRAP: "true"}), CONFIG) is None
    both = {L.NYDUS_BOOTSTRAP: "true", L.NYDUS_BLOB: "true"}  # bootstrap wins, as upstream's rule order
    assert NYDUS.claim_layer(layer(tmp_path, both), CONFIG) is None


def test_format_claim_layer_plain_oci(tmp_path: Path) -> None:
    assert NYDUS.claim_layer(layer(tmp_path, {L.CRI_IMAGE_REF: REF}), CONFIG) is None


def test_format_find_image_nearest_meta(tmp_path: Path) -> None:
    labels = {L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: REF, L.NYDUS_FS_VERSION: "6"}
    chain = [
        entry(tmp_path, "9", {}),  # a container layer committed on top (e.g. docker build)
        entry(tmp_path, "8", labels, "image/image.boot"),
        entry(tmp_path, "7", {L.NYDUS_BLOB: "true"}),
        entry(tmp_path, "6", {**labels, L.CRI_IMAGE_REF: "other"}, "image/image.boot"),
    ]
    src = NYDUS.find_image("k", chain, CONFIG)
    assert src is not None
    assert (src.format, src.meta_id, src.image_ref) == ("nydus", "8", REF)
    assert src.bootstrap == tmp_path / "8" / "fs" / "image" / "image.boot"
    assert src.labels == labels


def test_format_find_image_legacy_bootstrap_and_stargz_reference(tmp_path: Path) -> None:
    chain = [entry(tmp_path, "3", {L.NYDUS_BOOTSTRAP: "true", L.STARGZ_REFERENCE: REF}, "image.boot")]
    src = NYDUS.find_image("k", chain, CONFIG)
    assert src is not None and src.image_ref == REF
    assert src.bootstrap == tmp_path / "3" / "fs" / "image.boot"


def test_format_find_image_plain_chain(tmp_path: Path) -> None:
    chain = [entry(tmp_path, "2", {L.CRI_IMAGE_REF: REF}), entry(tmp_path, "1", {})]
    assert NYDUS.find_image("k", chain, CONFIG) is None
    assert NYDUS.find_image("k", [], CONFIG) is None


def test_format_find_image_without_ref_labels_says_what_to_configure(tmp_path: Path) -> None:
    chain = [entry(tmp_path, "4", {L.NYDUS_BOOTSTRAP: "true"}, "image/image.boot")]
    with pytest.raises(FailedPrecondition) as exc:
        NYDUS.find_image("ctr-key", chain, CONFIG)
    msg = str(exc.value)
    assert "disable_snapshot_annotations = false" in msg
    assert "nerdctl" in msg and "ctr-remote image rpull" in msg and "`ctr image pull` sends no labels" in msg
    assert L.CRI_IMAGE_REF in msg and "snapshot 4" in msg


def test_format_find_image_without_bootstrap_file(tmp_path: Path) -> None:
    chain = [entry(tmp_path, "5", {L.NYDUS_BOOTSTRAP: "true", L.CRI_IMAGE_REF: REF})]
    with pytest.raises(FailedPrecondition, match="has no bootstrap"):
        NYDUS.find_image("k", chain, CONFIG)


def test_nydus_formats() -> None:
    """The built-in plugin yields one record, named like `ImageSource.format`, asked first."""
    records = list(nydus_format.nydus_formats())
    assert [(r.name, type(r.format)) for r in records] == [("nydus", nydus_format.NydusFormat)]
    pm = build_plugin_manager(entry_points=False, env={})
    assert pm.registry.formats["nydus"].plugin.name == "nydus_core.control.formats.nydus"
    assert pm.registry.formats["nydus"].plugin.distribution == "nydus-core"


def test_format_enabled(snapshotter: Any, nydus_config: SnapshotterConfig) -> None:
    """A format the configuration switches off is never asked; switched on, it claims layers."""
    asked: list[str] = []

    class Switched(ImageFormat):
        def enabled(self, config: SnapshotterConfig) -> bool:
            return config.experimental.enable_stargz

        def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
            asked.append(layer.key)
            return LayerClaim(format="switched")

    class Plugin:
        @hookimpl
        def nydus_formats(self) -> list[FormatRecord]:
            return [FormatRecord(name="switched", format=Switched(), priority=1000)]

    labels = {L.TARGET_SNAPSHOT_REF: "sha256:l1"}
    off = snapshotter(Plugin())
    assert [m.type for m in off.prepare("extract-1", labels=labels)] == ["bind"]  # unpacked as usual
    assert asked == []
    stargz_on = attrs.evolve(nydus_config.experimental, enable_stargz=True)
    on_config = attrs.evolve(nydus_config, experimental=stargz_on)
    on = snapshotter(Plugin(), config=on_config)
    with pytest.raises(grpc.RpcError) as exc:
        on.prepare("extract-2", labels={L.TARGET_SNAPSHOT_REF: "sha256:l2"})
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS and asked == ["extract-2"]


def test_format_open_gets_the_context_and_claims_see_the_chain(
    snapshotter: Any, snapshotter_root: Path
) -> None:
    """An enabled format is opened once with root, config and hooks before it is asked, and a
    claimed layer's `Layer.chain` holds its committed parents nearest first."""
    opened: list[Any] = []
    chains: list[list[str]] = []

    class Opened(ImageFormat):
        def open(self, ctx: Any) -> None:
            super().open(ctx)
            opened.append(ctx)

        def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
            assert opened, "claim_layer before open"
            chains.append([c.name for c in layer.chain])
            return LayerClaim(format="opened", labels={"x-claimed": "1"})

    class Plugin:
        @hookimpl
        def nydus_formats(self) -> list[FormatRecord]:
            return [FormatRecord(name="opened", format=Opened(), priority=1000)]

    sn = snapshotter(Plugin())
    assert len(opened) == 1
    ctx = opened[0]
    assert ctx.root == Path(sn.root) and ctx.config is sn.config and callable(ctx.hooks.credentials)
    for i, parent in enumerate(["", "sha256:c1"], start=1):
        with pytest.raises(grpc.RpcError):
            sn.prepare(f"extract-{i}", parent=parent, labels={L.TARGET_SNAPSHOT_REF: f"sha256:c{i}"})
    assert chains == [[], ["sha256:c1"]]
    assert len(opened) == 1
