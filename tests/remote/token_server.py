"""A small docker-registry token server (the ``auth: token:`` realm) for the bearer-auth tests.

It answers ``GET /token?service=...&scope=repository:<name>:<actions>`` with a JWT signed RS256
by a key whose certificate is the registry's ``rootcertbundle``; the certificate goes in the
``x5c`` header, which is how distribution 2.8 finds and checks the signing key. Users are checked
with HTTP basic auth; anonymous requests get pull access only when `anonymous_pull` is set.
Every request is recorded (scope, user, user agent) so a test can tell who asked for a token.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from remote_pki import KeyPair

ISSUER = "nydus-core-test-issuer"
SERVICE = "nydus-core-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@attrs.frozen
class TokenRequest:
    scope: str
    user: str | None  # None: anonymous
    user_agent: str
    granted: bool


class TokenServer:
    def __init__(self, signing: KeyPair, users: Mapping[str, str], anonymous_pull: bool = False,
                 lifetime: int = 300) -> None:
        self.users = dict(users)
        self._bundle = signing.cert
        self.anonymous_pull = anonymous_pull
        self.lifetime = lifetime
        key = serialization.load_pem_private_key(signing.key.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self._key = key
        cert = x509.load_pem_x509_certificate(signing.cert.read_bytes())
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._lock = threading.Lock()
        self.requests: list[TokenRequest] = []
        #: The next N tokens are issued already expired (beyond the registry's 60 s leeway) while
        #: ``expires_in`` says they are good: the client caches them and must refresh on the 401.
        self.issue_expired = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth_config(self) -> dict[str, object]:
        """The ``auth`` section of a docker-registry config that trusts this server."""
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(self._bundle)}}

    def start(self) -> TokenServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="token-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def count(self, user_agent_prefix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.user_agent.startswith(user_agent_prefix))

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _take_expired(self) -> bool:
        with self._lock:
            if self.issue_expired > 0:
                self.issue_expired -= 1
                return True
            return False

    def issue(self, service: str, scopes: list[str], user: str | None) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            anonymous = [a for a in wanted if a == "pull" and self.anonymous_pull]
            granted = wanted if user is not None else anonymous
            if kind and name and granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        if self._take_expired():
            now -= 3600
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER, "sub": user or "", "aud": service, "exp": now + self.lifetime,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"


def _handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, status: int, doc: dict[str, object]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            scopes = query.get("scope", [])
            service = (query.get("service") or [SERVICE])[0]
            agent = self.headers.get("User-Agent", "")
            user: str | None = None
            auth = self.headers.get("Authorization", "")
            if auth.lower().startswith("basic "):
                try:
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                except ValueError:
                    name, password = "", ""
                if self.users.get(name) != password or not name:
                    server._record(TokenRequest(" ".join(scopes), name, agent, False))
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                user = name
            elif not server.anonymous_pull:
                server._record(TokenRequest(" ".join(scopes), None, agent, False))
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "login required"}]})
                return
            server._record(TokenRequest(" ".join(scopes), user, agent, True))
            token = server.issue(service, scopes, user)
            self._reply(200, {"token": token, "access_token": token, "expires_in": server.lifetime})

        def do_POST(self) -> None:
            # The OAuth2 password grant is not offered: 405 makes containerd (which tries it first
            # when it has credentials) fall back to the GET flow above, as with Docker Hub's realm.
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._reply(405, {"errors": [{"code": "UNSUPPORTED", "message": "use GET"}]})

        @property
        def users(self) -> dict[str, str]:
            return server.users

    return Handler
