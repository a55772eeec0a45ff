"""CRI ImageService stubs for tests that pull images the way kubelet does.

Generated at test time from the small ``cri_image.proto`` beside this module (the few messages
of ``runtime.v1.ImageService`` a pull needs), with grpcio-tools (a development dependency: the
fixture skips without it).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

PROTO = Path(__file__).with_name("cri_image.proto")


@pytest.fixture(scope="session")
def cri_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """``(cri_image_pb2, cri_image_pb2_grpc)``."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools generates the CRI stubs")
    out = tmp_path_factory.mktemp("cri-stubs")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(PROTO)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("cri_image_pb2"), importlib.import_module("cri_image_pb2_grpc")
    finally:
        sys.path.remove(str(out))
