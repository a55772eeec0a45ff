"""Errors of the registry client.

Messages name the host, repository and a URL with its query string removed (a presigned
redirect URL can carry a signature), and never a credential.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Drop userinfo, query and fragment: what is left is safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RegistryError(Exception):
    """A registry request failed; `status` is the HTTP status (0 when no response came back)."""

    def __init__(self, message: str, *, status: int = 0, url: str = "") -> None:
        self.status = status
        self.url = redact_url(url) if url else ""
        detail = message
        if status:
            detail += f" (HTTP {status})"
        if self.url:
            detail += f" [{self.url}]"
        super().__init__(detail)


class RegistryAuthError(RegistryError):
    """Credentials are missing or were refused; the message names host and repository, never the secret."""


class BlobNotFound(RegistryError):
    """The registry answered 404 for a blob or manifest."""
