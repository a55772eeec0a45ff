"""A synchronous OCI distribution client for the daemon (ranged blob reads) and the converter (pushes).

One `RegistryClient` serves one repository on one registry and may be used from many threads at
once: httpx's connection pool is thread-safe and the auth state is behind a lock. Reads try the
configured mirrors first (see `nydus_core.data.remote.mirrors`) and fall back to the origin without
failing; writes always go to the origin.

Why the details matter:

* A blob read must never silently return the wrong bytes, so a ranged GET must come back as 206
  with exactly the bytes asked for. Some servers ignore ``Range`` and send the whole blob with 200;
  the slice is then taken from it (and a warning logged once per client), because failing would
  make such a registry unusable.
* Registries commonly redirect blob GETs to a storage service on another host; the
  ``Authorization`` header is for the registry only and is dropped whenever a redirect changes host.
* Connection errors, 5xx and 429 are retried with a bounded exponential backoff; a 4xx is final.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import attrs
import httpx

from nydus_core.data.remote.challenge import Authenticator, CredentialsProvider, parse_challenge
from nydus_core.data.remote.errors import BlobNotFound, RegistryAuthError, RegistryError, redact_url
from nydus_core.data.remote.mirrors import MirrorConfig, MirrorHealth
from nydus_core.data.remote.reference import DOCKER_HUB, DOCKER_HUB_API

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: What `get_manifest` accepts unless told otherwise; choosing a platform from an index is the caller's job.
DEFAULT_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

USER_AGENT = "nydus-core-remote/0.1"
MAX_REDIRECTS = 5
#: Ranges closer than this are fetched in one request by `read_ranges` (wasted bytes are cheaper than RTTs).
DEFAULT_MERGE_GAP = 64 * 1024
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MAX_BACKOFF = 2.0


@attrs.frozen
class Manifest:
    data: bytes
    media_type: str
    digest: str


@attrs.frozen
class _Endpoint:
    """Somewhere requests for this repository can go: the origin or one mirror."""

    api_root: str  # scheme://host[:port][/path]/v2
    host: str
    http: httpx.Client
    headers: Mapping[str, str]
    is_mirror: bool = False
    auth_through: bool = True
    health: MirrorHealth | None = None
    capabilities: tuple[str, ...] = ("pull", "resolve", "push")


def _tls_verify(ca_files: Sequence[str], skip_verify: bool) -> ssl.SSLContext | bool:
    """Verification is on unless asked otherwise; extra CA files are added to the system roots."""
    if skip_verify:
        return False
    return _tls_context(tuple(ca_files))


@functools.lru_cache(maxsize=32)
def _tls_context(ca_files: tuple[str, ...]) -> ssl.SSLContext:
    """One context per CA set and process: loading the system roots costs tens of milliseconds,
    and a shared daemon opens a client per image (a failover re-opens them all at once).
    Contexts are safe to share between clients and threads; a failed load is not cached."""
    ctx = ssl.create_default_context()
    for ca in ca_files:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"cannot load CA file {ca}: {e}") from e
    return ctx


def warm_up() -> None:
    """Build what the first client of this process needs (imports, the default TLS context), so
    that a daemon waiting to take over does not spend that inside the failover pause."""
    _tls_context(())


def _tls_failure(e: BaseException) -> str | None:
    """The TLS error behind a transport error, if any: those are never worth retrying."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return getattr(seen, "verify_message", None) or seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    return text if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text else None


def blob_digest(blob: str) -> str:
    """A digest for a blob URL: nydus names blobs by bare sha256 hex (the RAFS blob id), OCI by digest."""
    if ":" not in blob and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return "sha256:" + blob
    if ":" not in blob or "/" in blob or "?" in blob or "#" in blob:
        raise ValueError(f"not a blob digest or nydus blob id: {blob!r}")
    return blob


def _digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def coalesce(ranges: Sequence[tuple[int, int]], max_gap: int) -> list[tuple[int, int, list[int]]]:
    """Group ``(offset, size)`` ranges into spans ``(start, end, [indexes])`` at most `max_gap` apart."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    spans: list[tuple[int, int, list[int]]] = []
    for i in order:
        off, size = ranges[i]
        if off < 0 or size < 0:
            raise ValueError(f"bad range offset={off} size={size}")
        end = off + size
        if spans and off <= spans[-1][1] + max_gap:
            start, prev_end, members = spans[-1]
            spans[-1] = (start, max(prev_end, end), [*members, i])
        else:
            spans.append((off, end, [i]))
    return spans


class RegistryClient:
    """Client for ``host/repo``. See the module docstring for the rules it follows.

    `credentials_provider` is called with a registry host name and returns `Credentials` or
    ``None`` (anonymous). `mirrors` are tried in order for reads. `timeout` bounds each read of
    the socket, `connect_timeout` each connect; `retries` is the number of extra attempts after a
    retryable failure (0 = try once).
    """

    def __init__(
        self,
        host: str,
        repo: str,
        *,
        credentials_provider: CredentialsProvider | None = None,
        plain_http: bool = False,
        scheme: str | None = None,
        ca_files: Sequence[str] = (),
        skip_verify: bool = False,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.1,
        mirrors: Sequence[MirrorConfig] = (),
        max_connections: int = 32,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not host or "/" in host:
            raise ValueError(f"registry host must be host[:port], got {host!r}")
        if not repo:
            raise ValueError("repository must not be empty")
        self.host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.repo = repo
        if scheme is None:
            scheme = "http" if plain_http else "https"
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        self.scheme = scheme
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._clients: list[httpx.Client] = []
        origin_http = self._new_http(ca_files, skip_verify)
        self._origin = _Endpoint(
            api_root=f"{scheme}://{self.host}/v2", host=self.host, http=origin_http,
            headers=dict(headers or {}),
        )
        self._mirrors = [self._mirror_endpoint(m) for m in mirrors]
        self.auth = Authenticator(origin_http, credentials_provider)
        self._warned_full_body = False
        self._origin_pinged = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ setup

    def _new_http(self, ca_files: Sequence[str], skip_verify: bool) -> httpx.Client:
        client = httpx.Client(
            verify=_tls_verify(ca_files, skip_verify),
            timeout=self._timeout,
            limits=self._limits,
            follow_redirects=False,  # redirects are followed by hand so Authorization can be dropped
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        )
        self._clients.append(client)
        return client

    def _mirror_endpoint(self, m: MirrorConfig) -> _Endpoint:
        return _Endpoint(
            api_root=m.api_root, host=m.host, http=self._new_http(m.ca_files, m.skip_verify),
            headers=dict(m.headers), is_mirror=True, auth_through=m.auth_through,
            health=MirrorHealth(m), capabilities=m.capabilities,
        )

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mirrors(self) -> list[MirrorHealth]:
        return [m.health for m in self._mirrors if m.health is not None]

    # ------------------------------------------------------------------ request machinery

    def _scope(self, push: bool = False) -> str:
        return f"repository:{self.repo}:{'pull,push' if push else 'pull'}"

    def _auth_header(self, ep: _Endpoint, scope: str, refresh: bool = False) -> str | None:
        if ep.is_mirror and not ep.auth_through:
            # The mirror gets the origin's authorization; the token request goes to the origin's realm.
            self._learn_origin_challenge()
            return self.auth.header(self.host, self.repo, scope, creds_host=self.host, refresh=refresh)
        # A mirror answering its own challenge gets its own credentials if the user has some for it
        # (containerd's hosts.toml semantics), else the origin's (nydusd's auth_through).
        creds_host = self.host
        if ep.is_mirror and self.auth.known_challenge(ep.host) is not None \
                and self.auth.credentials_for(ep.host) is not None:
            creds_host = ep.host
        return self.auth.header(ep.host, self.repo, scope, creds_host=creds_host, refresh=refresh)

    def _learn_origin_challenge(self) -> None:
        """Ask the origin's ``/v2/`` once how it wants to be authenticated (for non-auth-through mirrors)."""
        with self._lock:
            if self._origin_pinged:
                return
            self._origin_pinged = True
        try:
            resp = self._origin.http.get(self._origin.api_root + "/")
        except httpx.HTTPError as e:
            log.warning("cannot reach origin %s to learn its auth scheme: %s", self.host, type(e).__name__)
            return
        if resp.status_code == 401:
            ch = parse_challenge(resp.headers.get("www-authenticate", ""))
            if ch is not None:
                self.auth.remember(self.host, ch)

    def _sleep_backoff(self, attempt: int) -> None:
        time.sleep(min(self.backoff * (2**attempt), _MAX_BACKOFF))

    def _send(
        self,
        ep: _Endpoint,
        method: str,
        url: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], bytes | Iterable[bytes]] | None = None,
        stream: bool = False,
        retries: int | None = None,
    ) -> httpx.Response:
        """One logical request: auth, retries with backoff, redirects. Returns a non-401 response.

        With `stream` the caller must close the response.
        """
        retries = self.retries if retries is None else retries
        attempt = 0
        auth_rounds = 0
        refresh = False
        auth_host = self.host if (ep.is_mirror and not ep.auth_through) else ep.host
        while True:
            hdrs = {**ep.headers, **(headers or {})}
            auth = self._auth_header(ep, scope, refresh=refresh)
            refresh = False
            if auth:
                hdrs["Authorization"] = auth
            try:
                resp = self._send_following(ep, method, url, hdrs, body, stream)
            except httpx.TransportError as e:
                tls = _tls_failure(e)
                if tls is not None:
                    raise RegistryError(
                        f"TLS verification of {urlsplit(url).netloc} failed ({tls}); configure its CA "
                        "(ca_files / hosts.toml ca) or skip_verify", url=url
                    ) from e
                if attempt < retries:
                    log.info("%s %s: %s; retry %d/%d", method, redact_url(url), type(e).__name__,
                             attempt + 1, retries)
                    self._sleep_backoff(attempt)
                    attempt += 1
                    continue
                raise RegistryError(f"{method} failed after {attempt + 1} attempts: {type(e).__name__}: {e}",
                                    url=url) from e
            if resp.status_code == 401:
                challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
                resp.close()
                if challenge is None:
                    raise RegistryAuthError(f"registry {ep.host} refused access to {self.repo} without a "
                                            "usable WWW-Authenticate challenge", status=401, url=url)
                if ep.is_mirror and not ep.auth_through:
                    raise RegistryAuthError(f"mirror {ep.host} asks for its own authentication but "
                                            "auth_through is false", status=401, url=url)
                if auth_rounds >= 1:
                    creds_used = (auth is not None and auth.lower().startswith("basic ")) or \
                        self.auth.credentials_for(self.host) is not None
                    what = "the credentials" if creds_used else "anonymous access"
                    raise RegistryAuthError(f"registry {ep.host} refused {what} to {self.repo}",
                                            status=401, url=url)
                auth_rounds += 1
                # Sent a header built from an earlier challenge: its token expired or was revoked.
                refresh = auth is not None
                self.auth.remember(auth_host, challenge)
                continue
            if resp.status_code in _RETRY_STATUSES and attempt < retries:
                resp.close()
                log.info("%s %s: HTTP %d; retry %d/%d", method, redact_url(url), resp.status_code,
                         attempt + 1, retries)
                self._sleep_backoff(attempt)
                attempt += 1
                continue
            return resp

    def _send_following(
        self,
        ep: _Endpoint,
        method: str,
        url: str,
        headers: dict[str, str],
        body: Callable[[], bytes | Iterable[bytes]] | None,
        stream: bool,
    ) -> httpx.Response:
        origin_netloc = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            content = body() if body is not None else None
            req = ep.http.build_request(method, url, headers=headers, content=content)
            resp = ep.http.send(req, stream=stream)
            if resp.status_code not in (301, 302, 303, 307, 308) or "location" not in resp.headers:
                return resp
            resp.close()
            url = urljoin(url, resp.headers["location"])
            if urlsplit(url).netloc != origin_netloc:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects", url=url)

    def _check(self, resp: httpx.Response, what: str, *ok: int) -> None:
        if resp.status_code in ok:
            return
        url = str(resp.request.url)
        try:
            text = resp.read()[:300].decode(errors="replace")
        except httpx.HTTPError:
            text = ""
        finally:
            resp.close()
        if resp.status_code == 404:
            raise BlobNotFound(f"{what}: not found in {self.host}/{self.repo}", status=404, url=url)
        if resp.status_code == 403:
            raise RegistryAuthError(
                f"{what}: access to {self.repo} on {self.host} denied", status=403, url=url
            )
        raise RegistryError(f"{what} on {self.host}/{self.repo} failed: {text.strip()}",
                            status=resp.status_code, url=url)

    def _read_endpoints(self, capability: str) -> Iterator[_Endpoint]:
        for m in self._mirrors:
            if capability in m.capabilities and m.health is not None and m.health.usable(m.http):
                yield m
        yield self._origin

    def _read(
        self,
        what: str,
        path: str,
        ok: Sequence[int],
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
        capability: str = "pull",
        stream: bool = False,
    ) -> httpx.Response:
        """A read through the first mirror that answers, else the origin; the response status is in `ok`."""
        scope = self._scope()
        for ep in self._read_endpoints(capability):
            url = ep.api_root + path
            if not ep.is_mirror:
                resp = self._send(ep, method, url, scope=scope, headers=headers, stream=stream)
                self._check(resp, what, *ok)
                return resp
            assert ep.health is not None
            try:
                # A mirror gets one try: the origin is the retry.
                resp = self._send(ep, method, url, scope=scope, headers=headers, stream=stream, retries=0)
            except RegistryError as e:
                ep.health.failure(str(e))
                log.info("%s via mirror %s failed (%s); trying the next source", what, ep.host, e)
                continue
            if resp.status_code in ok:
                ep.health.success()
                return resp
            if resp.status_code >= 500:
                ep.health.failure(f"HTTP {resp.status_code}")
            resp.close()
            log.info("%s via mirror %s: HTTP %d; trying the next source", what, ep.host, resp.status_code)
        raise AssertionError("unreachable: the origin always answers or raises")

    # ------------------------------------------------------------------ reads

    def ping(self) -> None:
        """``GET /v2/`` with auth; raises `RegistryAuthError`/`RegistryError` if the registry is unusable."""
        resp = self._send(self._origin, "GET", self._origin.api_root + "/", scope=self._scope())
        self._check(resp, "ping", 200)
        resp.close()

    def get_manifest(self, reference: str, accept: Sequence[str] = DEFAULT_MANIFEST_TYPES) -> Manifest:
        """Fetch a manifest or index by tag or digest. The digest is checked when `reference` is one."""
        capability = "pull" if reference.startswith("sha256:") else "resolve"
        resp = self._read(f"manifest {reference}", f"/{self.repo}/manifests/{reference}", (200,),
                          headers={"Accept": ", ".join(accept)}, capability=capability)
        data = resp.content
        digest = _digest_of(data)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"manifest {reference} from {self.host}/{self.repo} has digest {digest}",
                                url=str(resp.request.url))
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        server_digest = resp.headers.get("docker-content-digest", digest)
        return Manifest(data=data, media_type=media_type, digest=server_digest)

    def blob_size(self, digest: str) -> int:
        """Size of a blob from a HEAD request."""
        digest = blob_digest(digest)
        resp = self._read(f"blob {digest}", f"/{self.repo}/blobs/{digest}", (200,), method="HEAD")
        resp.close()
        try:
            return int(resp.headers["content-length"])
        except (KeyError, ValueError) as e:
            raise RegistryError(
                f"HEAD of blob {digest} has no Content-Length", url=str(resp.request.url)
            ) from e

    def blob_exists(self, digest: str) -> bool:
        try:
            self.blob_size(digest)
        except BlobNotFound:
            return False
        return True

    @contextlib.contextmanager
    def open_blob(self, digest: str, chunk_size: int = 1 << 20) -> Iterator[Iterator[bytes]]:
        """Stream a whole blob: ``with client.open_blob(d) as chunks: for b in chunks: ...``."""
        digest = blob_digest(digest)
        resp = self._read(f"blob {digest}", f"/{self.repo}/blobs/{digest}", (200,), stream=True)
        try:
            yield resp.iter_bytes(chunk_size)
        finally:
            resp.close()

    def get_blob(self, digest: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Generator over a whole blob's bytes (the response is closed when it is exhausted or closed)."""
        with self.open_blob(digest, chunk_size) as chunks:
            yield from chunks

    def read_blob(self, digest: str) -> bytes:
        """A whole blob in memory, digest-checked."""
        digest = blob_digest(digest)
        data = b"".join(self.get_blob(digest))
        if digest.startswith("sha256:") and _digest_of(data) != digest:
            raise RegistryError(f"blob {digest} from {self.host}/{self.repo} does not match its digest")
        return data

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of a blob with one HTTP Range request.

        `digest` is ``sha256:<hex>`` or a nydus blob id (bare hex), so the blob cache can pass its ids.
        """
        digest = blob_digest(digest)
        if offset < 0 or size < 0:
            raise ValueError(f"bad range offset={offset} size={size}")
        if size == 0:
            return b""
        what = f"blob {digest} range {offset}+{size}"
        resp = self._read(what, f"/{self.repo}/blobs/{digest}", (200, 206),
                          headers={"Range": f"bytes={offset}-{offset + size - 1}"})
        data = resp.content
        if resp.status_code == 200:
            if not self._warned_full_body:
                self._warned_full_body = True
                log.warning("%s ignored the Range header and sent the whole blob; slicing it (logged once)",
                            urlsplit(str(resp.request.url)).netloc)
            data = data[offset : offset + size]
        if len(data) != size:
            raise RegistryError(f"{what}: got {len(data)} bytes", status=resp.status_code,
                                url=str(resp.request.url))
        return data

    def read_ranges(self, digest: str, ranges: Sequence[tuple[int, int]],
                    max_gap: int = DEFAULT_MERGE_GAP) -> list[bytes]:
        """Several ``(offset, size)`` ranges of one blob; ranges within `max_gap` share one request.

        Results are returned in the order of `ranges`.
        """
        out: list[bytes] = [b""] * len(ranges)
        for start, end, members in coalesce(ranges, max_gap):
            span = self.read_range(digest, start, end - start) if end > start else b""
            for i in members:
                off, size = ranges[i]
                out[i] = span[off - start : off - start + size]
        return out

    # ------------------------------------------------------------------ writes (converter)

    def _origin_send(self, method: str, url: str, what: str, ok: Sequence[int], *,
                     headers: Mapping[str, str] | None = None,
                     body: Callable[[], bytes | Iterable[bytes]] | None = None) -> httpx.Response:
        resp = self._send(self._origin, method, url, scope=self._scope(push=True), headers=headers, body=body)
        self._check(resp, what, *ok)
        return resp

    def _blob_exists_at_origin(self, digest: str) -> bool:
        url = f"{self._origin.api_root}/{self.repo}/blobs/{digest}"
        resp = self._send(self._origin, "HEAD", url, scope=self._scope(push=True))
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        self._check(resp, f"HEAD blob {digest}", 200)
        return False

    def push_blob(self, data: bytes | Path | BinaryIO, digest: str | None = None,
                  mount_from: str | None = None) -> tuple[str, bool]:
        """Upload a blob (POST + monolithic PUT); returns ``(digest, uploaded)``.

        Nothing is sent when the registry already has it. `mount_from` names another repository of
        the same registry to mount the blob from instead of uploading it.
        """
        if isinstance(data, bytes):
            size = len(data)
            digest = digest or _digest_of(data)
            payload: Callable[[], bytes | Iterable[bytes]] = lambda: data  # noqa: E731
        else:
            fobj = open(data, "rb") if isinstance(data, Path) else data  # noqa: SIM115
            if digest is None:
                h = hashlib.sha256()
                fobj.seek(0)
                for block in iter(lambda: fobj.read(1 << 20), b""):
                    h.update(block)
                digest = "sha256:" + h.hexdigest()
            size = fobj.seek(0, io.SEEK_END)

            def payload() -> Iterable[bytes]:
                fobj.seek(0)
                return iter(lambda: fobj.read(1 << 20), b"")

        try:
            if self._blob_exists_at_origin(digest):
                return digest, False
            uploads = f"{self._origin.api_root}/{self.repo}/blobs/uploads/"
            if mount_from:
                resp = self._origin_send("POST", f"{uploads}?mount={digest}&from={mount_from}",
                                         f"mount blob {digest}", (201, 202),
                                         headers={"Content-Length": "0"})
                resp.close()
                if resp.status_code == 201:
                    return digest, False
            else:
                resp = self._origin_send("POST", uploads, f"start upload of {digest}", (202,),
                                         headers={"Content-Length": "0"})
                resp.close()
            location = resp.headers.get("location")
            if not location:
                raise RegistryError(f"upload of {digest}: no Location in 202 answer", url=uploads)
            put_url = urljoin(uploads, location)
            put_url += ("&" if "?" in put_url else "?") + f"digest={digest}"
            resp = self._origin_send("PUT", put_url, f"upload blob {digest}", (201,),
                                     headers={"Content-Type": "application/octet-stream",
                                              "Content-Length": str(size)},
                                     body=payload)
            resp.close()
            return digest, True
        finally:
            if isinstance(data, Path):
                fobj.close()

    def push_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; returns its digest."""
        url = f"{self._origin.api_root}/{self.repo}/manifests/{reference}"
        resp = self._origin_send("PUT", url, f"push manifest {reference}", (201,),
                                 headers={"Content-Type": media_type}, body=lambda: body)
        resp.close()
        return resp.headers.get("docker-content-digest") or _digest_of(body)
