"""Built-in credentials provider with the highest priority: the snapshot's pull labels.

Clients (e.g. ``ctr-remote --user``) pass ``containerd.io/snapshot/pullusername`` and
``pullsecret``; they win over any file-based keychain, as upstream orders it.
"""

from __future__ import annotations

from collections.abc import Mapping

from nydus_core.data.remote.auth import from_labels
from nydus_core.data.remote.credentials import Credentials
from nydus_core.hookspecs import hookimpl


@hookimpl(tryfirst=True)
def nydus_credentials(host: str, ref: str, labels: Mapping[str, str]) -> Credentials | None:
    return from_labels(labels)
