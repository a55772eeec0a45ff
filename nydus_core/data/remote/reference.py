"""Split an image reference into registry host and repository, the way docker normalises it.

nydusd needs ``device.backend.config.host`` and ``repo``: ``busybox`` means
``docker.io/library/busybox:latest``, and the Docker Hub API lives at ``index.docker.io``.
"""

from __future__ import annotations

import attrs

from nydus_core.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "index.docker.io"


@attrs.frozen
class ImageRef:
    """``host`` is as written (``docker.io`` not rewritten); `api_host` is what nydusd must dial."""

    host: str
    repo: str
    tag: str = ""
    digest: str = ""

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host


def parse_ref(ref: str) -> ImageRef:
    """Parse ``[host[:port]/]path[:tag][@digest]``; the tag defaults to ``latest`` without digest."""
    if not ref or ref != ref.strip() or any(c.isspace() for c in ref):
        raise InvalidArgument(f"invalid image reference {ref!r}")
    name, _, digest = ref.partition("@")
    # A tag is a ':' after the last '/', so host ports are not mistaken for tags.
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = DOCKER_HUB, name
    if host in (DOCKER_HUB_API, "registry-1.docker.io"):
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or path.startswith("/") or path.endswith("/") or "//" in path:
        raise InvalidArgument(f"invalid image reference {ref!r}: bad repository path")
    if not tag and not digest:
        tag = "latest"
    return ImageRef(host=host, repo=path, tag=tag, digest=digest)
