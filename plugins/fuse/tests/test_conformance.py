"""The fusedev backend runs the backend conformance suite (`nydus_core.testing.conformance`), as
every backend distribution does: dedicated daemons restarted after a kill, and a shared daemon
under failover, where a container running across the kill never notices."""

from __future__ import annotations

import pytest

from nydus_core.testing.conformance import BackendConformance

pytestmark = [pytest.mark.containerd, pytest.mark.root]


class TestFusedevDedicated(BackendConformance):
    fs_driver = "fusedev"
    daemon_mode = "dedicated"
    recover_policy = "restart"


class TestFusedevSharedFailover(BackendConformance):
    fs_driver = "fusedev"
    daemon_mode = "shared"
    recover_policy = "failover"
