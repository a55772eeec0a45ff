"""Moved to `nydus_core.data.remote.reference` (the registry client needs it too); kept as an alias."""

from nydus_core.data.remote.reference import DOCKER_HUB, DOCKER_HUB_API, ImageRef, parse_ref

__all__ = ["DOCKER_HUB", "DOCKER_HUB_API", "ImageRef", "parse_ref"]
