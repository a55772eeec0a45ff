"""pytest plugin for nydus-core and for third-party plugin authors (entry point ``pytest11``).

Fixtures for the plugin manager and a throw-away snapshotter live here; fixtures for real
services (docker-registry, containerd, test images) live in `nydus_core.testing.services`.
"""

from __future__ import annotations

from nydus_core.testing.services import *  # noqa: F403
