"""Registry credentials as the `nydus_credentials` hook returns them."""

from __future__ import annotations

import attrs


@attrs.frozen(repr=False)
class Credentials:
    """A username and secret for one registry host. An empty username means `secret` is a token."""

    username: str
    secret: str

    def __repr__(self) -> str:  # never let a secret reach a log line through repr()
        return f"Credentials(username={self.username!r}, secret=<hidden>)"
