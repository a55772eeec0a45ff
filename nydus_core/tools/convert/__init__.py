"""OCI image -> nydus (RAFS v6) image conversion and its verification (`nydusify`).

Modules:

* `constants` - media types and annotation keys as upstream nydusify writes them.
* `image` - registry access for both directions: clients from references and transport options,
  platform resolution, digest-verified blob downloads; `ConvertError`.
* `converter` - `convert()`: one nydus blob per layer, merged bootstrap layer, config, manifest.
* `check` - `check()`: packaging checks and a tree/bytes comparison with the source image.
* `progress` - a per-layer progress bar on terminals, log lines elsewhere.

The `nydusify` console script (`nydus_core.cli.nydusify`) wraps these.
"""

from __future__ import annotations

from nydus_core.tools.convert.check import CheckOptions, CheckReport, check
from nydus_core.tools.convert.converter import ConvertOptions, ConvertResult, convert
from nydus_core.tools.convert.image import ConvertError, Transport

__all__ = [
    "CheckOptions",
    "CheckReport",
    "ConvertError",
    "ConvertOptions",
    "ConvertResult",
    "Transport",
    "check",
    "convert",
]
