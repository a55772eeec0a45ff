"""The ``nydus-fuse`` distribution's entry point (group ``nydus_core.plugins``, name ``fuse``).

It declares the ``fusedev`` backend and its config key; the backend module (and its imports) is
loaded only when the plugin manager asks for the records, and ``nydusd-py`` itself -- which builds
a plugin manager for its decoders -- never needs it.
"""

from __future__ import annotations

from collections.abc import Iterator

from nydus_core import hookimpl
from nydus_core.records import BackendRecord, ConfigOption


@hookimpl
def nydus_backends() -> Iterator[BackendRecord]:
    from nydus_fuse.backend.fusedev import CAPABILITIES, NAME, FusedevBackend

    yield BackendRecord(name=NAME, backend=FusedevBackend(), capabilities=CAPABILITIES,
                        description="nydusd-compatible daemons over FUSE (nydusd-py or nydusd)")  # fmt: skip


@hookimpl
def nydus_config_options() -> Iterator[ConfigOption]:
    from nydus_fuse.backend.fusedev import FAILOVER_STANDBY
    from nydus_fuse.backend.spare import SPARE_DAEMON

    yield FAILOVER_STANDBY
    yield SPARE_DAEMON
