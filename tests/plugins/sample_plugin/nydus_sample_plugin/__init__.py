"""A sample third-party nydus-core plugin.

* a ``sample`` image format that claims any layer labelled ``example.com/sample-claim``
  (containerd then skips its download), and marks the committed snapshot with
  ``example.com/sample-claimed``;
* leaves marker files in the snapshotter root when the snapshotter starts and stops, so a test can
  tell the hooks ran in the ``containerd-nydus-grpc`` process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from nydus_core import hookimpl
from nydus_core.config import SnapshotterConfig
from nydus_core.control.snapshot.model import Layer, LayerClaim
from nydus_core.records import FormatRecord, ImageFormat

CLAIM_LABEL = "example.com/sample-claim"
CLAIMED_LABEL = "example.com/sample-claimed"
STARTED_MARKER = "sample-plugin.started"
STOPPING_MARKER = "sample-plugin.stopping"


class SampleFormat(ImageFormat):
    def claim_layer(self, layer: Layer, config: SnapshotterConfig) -> LayerClaim | None:
        if CLAIM_LABEL not in layer.labels:
            return None
        return LayerClaim(format="sample", labels={CLAIMED_LABEL: layer.labels[CLAIM_LABEL]})


@hookimpl
def nydus_formats() -> Iterator[FormatRecord]:
    yield FormatRecord(name="sample", format=SampleFormat(), description="the test suite's sample format")


@hookimpl
def nydus_snapshotter_started(root: str, config: SnapshotterConfig) -> None:
    Path(root, STARTED_MARKER).write_text(f"{os.getpid()} {config.address}\n")


@hookimpl
def nydus_snapshotter_stopping(root: str) -> None:
    Path(root, STOPPING_MARKER).write_text(f"{os.getpid()}\n")
