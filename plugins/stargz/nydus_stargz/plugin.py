"""The ``nydus-stargz`` distribution's entry point (group ``nydus_core.plugins``, name ``stargz``).

Two records: the ``estargz`` format (snapshotter side, switched on by ``[experimental]
enable_stargz`` or ``--enable-stargz``) and the ``estargz-gzip`` decoder (daemon side). Each is
imported only when its record hook runs, so a daemon loading its decoders never imports the
snapshotter's registry and conversion code.
"""

from __future__ import annotations

from collections.abc import Iterator

from nydus_core import hookimpl
from nydus_core.records import DecoderRecord, FormatRecord


@hookimpl
def nydus_formats() -> Iterator[FormatRecord]:
    from nydus_stargz.detect import FORMAT, EstargzFormat

    # Below nydus (100): a layer with nydus labels is never probed.
    yield FormatRecord(
        name=FORMAT,
        format=EstargzFormat(),
        priority=50,
        description="eStargz and stargz layers, lazily, from their TOC ([experimental] enable_stargz)",
    )


@hookimpl
def nydus_decoders() -> Iterator[DecoderRecord]:
    from nydus_stargz.decoder import GZIP_MEMBER_DECODER

    yield DecoderRecord(
        name="estargz-gzip",
        decoder=GZIP_MEMBER_DECODER,
        priority=10,
        description="eStargz chunks: a gzip member's output from the inner offset",
    )
