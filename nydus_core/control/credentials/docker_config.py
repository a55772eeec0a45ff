"""Built-in credentials provider: the docker config file (``$DOCKER_CONFIG`` or ``~/.docker``).

It is a separate plugin from the label provider because pluggy orders implementations per
plugin: labels run first (``tryfirst``), third-party keychains next, this file last of all.
"""

from __future__ import annotations

from collections.abc import Mapping

from nydus_core.data.remote.auth import from_docker_config
from nydus_core.data.remote.credentials import Credentials
from nydus_core.hookspecs import hookimpl


@hookimpl(trylast=True)
def nydus_credentials(host: str, ref: str, labels: Mapping[str, str]) -> Credentials | None:
    return from_docker_config(host)
