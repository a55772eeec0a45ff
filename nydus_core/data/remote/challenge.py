"""Registry authentication: ``WWW-Authenticate`` challenges, basic headers and the bearer-token realm flow.

A registry tells a client how to authenticate only by refusing it: a 401 carries either
``Basic realm=...`` (htpasswd) or ``Bearer realm=...,service=...,scope=...`` (a token server).
`Authenticator` remembers each host's challenge, so later requests send the right header up
front instead of paying a 401 round trip each time, and caches bearer tokens until they expire.
It is shared by every thread that uses one `RegistryClient`.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable

import attrs
import httpx

from nydus_core.data.remote.credentials import Credentials
from nydus_core.data.remote.errors import RegistryAuthError, RegistryError, redact_url

log = logging.getLogger(__name__)

#: Asked for the credentials of a registry host; ``None`` means anonymous.
CredentialsProvider = Callable[[str], "Credentials | None"]

# The spec's default when a token response has no expires_in.
DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh a little early so a token never expires on the wire.
_EXPIRY_MARGIN = 5.0

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@attrs.frozen
class Challenge:
    """One parsed ``WWW-Authenticate`` header: scheme ``basic`` or ``bearer`` plus its parameters."""

    scheme: str
    params: dict[str, str] = attrs.field(factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` value; ``None`` if it is not Basic/Bearer."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "bearer"):
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = value.replace('\\"', '"')
        pos = m.end()
    return Challenge(scheme=scheme, params=params)


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.secret}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@attrs.define
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Per-host challenge memory and a bearer-token cache, safe to share between threads.

    `http` is the client used to call token realms (it carries the origin's TLS settings).
    `credentials` is called with a host name; the snapshotter passes a function that asks the
    ``nydus_credentials`` hook.
    """

    def __init__(self, http: httpx.Client, credentials: CredentialsProvider | None) -> None:
        self._http = http
        self._credentials = credentials
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._fetch_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._creds_cache: dict[str, Credentials | None] = {}
        #: Every token-realm request made (realm URL without query), for metrics and tests.
        self.token_requests = 0

    def credentials_for(self, host: str) -> Credentials | None:
        with self._lock:
            if host in self._creds_cache:
                return self._creds_cache[host]
        creds = self._credentials(host) if self._credentials is not None else None
        with self._lock:
            self._creds_cache[host] = creds
        return creds

    def known_challenge(self, host: str) -> Challenge | None:
        with self._lock:
            return self._challenges.get(host)

    def remember(self, host: str, challenge: Challenge) -> None:
        with self._lock:
            self._challenges[host] = challenge

    def header(
        self, host: str, repo: str, scope: str, *, creds_host: str, refresh: bool = False
    ) -> str | None:
        """The ``Authorization`` value for a request to `host`, or ``None`` if none is known to be needed.

        `refresh` drops a cached token first (the registry just refused it).
        """
        challenge = self.known_challenge(host)
        if challenge is None:
            return None
        creds = self.credentials_for(creds_host)
        if challenge.scheme == "basic":
            if creds is None or not creds.username:
                raise RegistryAuthError(
                    f"registry {host} requires basic authentication for {repo} and no credentials "
                    f"were found for {creds_host}"
                )
            return basic_header(creds)
        if creds is not None and not creds.username:
            # An identity/registry token configured by the user is sent as is (nydusd's registry_token).
            return "Bearer " + creds.secret
        token = self._bearer_token(host, repo, challenge, scope, creds, creds_host, refresh)
        return "Bearer " + token

    def _bearer_token(
        self,
        host: str,
        repo: str,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
        creds_host: str,
        refresh: bool,
    ) -> str:
        realm = challenge.realm
        if not realm:
            raise RegistryError(f"registry {host} sent a Bearer challenge without a realm")
        service = challenge.params.get("service", "")
        key = (realm, service, scope)
        with self._lock:
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
            stale = self._tokens.get(key) if refresh else None
        # One fetch per key at a time: threads that start together share the first thread's token.
        with fetch_lock:
            with self._lock:
                cached = self._tokens.get(key)
                if cached is not None and cached is not stale and cached.expires_at > time.monotonic():
                    return cached.value
                self._tokens.pop(key, None)
            return self._fetch_token(host, repo, key, creds, creds_host)

    def _fetch_token(
        self, host: str, repo: str, key: tuple[str, str, str], creds: Credentials | None, creds_host: str
    ) -> str:
        realm, service, scope = key
        params = {"scope": scope} if scope else {}
        if service:
            params["service"] = service
        headers = {}
        if creds is not None:
            params["account"] = creds.username
            headers["Authorization"] = basic_header(creds)
        with self._lock:
            self.token_requests += 1
        try:
            resp = self._http.get(realm, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise RegistryError(f"token request for {repo} on {host} failed: {type(e).__name__}: {e}",
                                url=realm) from e
        if resp.status_code in (401, 403):
            who = f"as {creds.username!r} (credentials for {creds_host})" if creds else "anonymously"
            raise RegistryAuthError(
                f"token server refused access to {repo} on {host} {who}", status=resp.status_code, url=realm
            )
        if resp.status_code != 200:
            raise RegistryError(f"token request for {repo} on {host} failed", status=resp.status_code,
                                url=realm)
        try:
            doc = resp.json()
        except ValueError as e:
            raise RegistryError(f"token server answered non-JSON for {repo} on {host}", url=realm) from e
        value = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"token server sent no token for {repo} on {host}", url=realm)
        lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
        try:
            lifetime = max(float(lifetime), 0.0)
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        with self._lock:
            self._tokens[key] = _Token(value, time.monotonic() + max(lifetime - _EXPIRY_MARGIN, 1.0))
        log.debug("got a bearer token for %s scope %r from %s", host, scope, redact_url(realm))
        return value
