"""A real SMART Backend Services token endpoint for tests, verifying like an EHR would.

    with start_token_server(clients=[...], expires_in=300) as server:
        server.token_url            # http://127.0.0.1:PORT/auth/token
        server.fhir_base_url        # http://127.0.0.1:PORT/fhir   (the token-checking FHIR proxy)
        server.token_requests       # how many POSTs /auth/token has seen (accepted or not)

Routes:
    GET  /.well-known/smart-configuration   discovery (also under /fhir/.well-known/...)
    POST /auth/token                        client_credentials; private_key_jwt or client_secret_basic
    POST /introspect                        RFC 7662: {"active": bool}
    GET  /jwks-registered/{client_id}       the JWKS registered for a client (debug aid)
    *    /fhir/{path}                       forwards to ``upstream_fhir_url`` when the bearer token is
                                            valid and unexpired, else 401; with no upstream, answers
                                            an empty searchset

Client assertions are verified with joserfc against the client's registered JWKS, with only RS384/ES384
allowed: ``iss`` = ``sub`` = client_id, ``aud`` = this token URL, ``exp`` present, not passed and at most
``MAX_ASSERTION_LIFETIME`` ahead, ``jti`` present, at most 151 characters and never seen before (replay
cache), and the right ``client_assertion_type``. Every rejection is an RFC 6749 error body.

The server has its own injectable ``clock`` so a test can move time for the client and the server together.
It runs uvicorn on a pre-bound loopback socket in a thread; ``start_token_server`` returns once uvicorn
reports it has started.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "MAX_ASSERTION_LIFETIME",
    "RegisteredClient",
    "TokenServer",
    "make_private_key_pem",
    "start_token_server",
]

MAX_ASSERTION_LIFETIME = 300
MAX_JTI_LENGTH = 151
STARTUP_TIMEOUT = 10.0
STARTUP_POLL = 0.005
PROXY_TIMEOUT = 10.0
ALGORITHMS = ["RS384", "ES384"]
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_HOP_HEADERS = frozenset(
    {"connection", "transfer-encoding", "content-length", "content-encoding", "keep-alive"}
)


def make_private_key_pem(algorithm: str) -> bytes:
    """A fresh PEM private key for RS384 (RSA 2048) or ES384 (P-384)."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS384":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        raise ValueError(f"unsupported algorithm {algorithm}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class RegisteredClient:
    """A client the test EHR knows: a JWKS for private_key_jwt, or a secret for client_secret_basic."""

    client_id: str
    jwks: Mapping[str, Any] | None = None
    secret: str | None = field(default=None, repr=False)


@dataclass
class _Issued:
    client_id: str
    expires_at: float
    scope: str
    revoked: bool = False


class _OAuthError(Exception):
    def __init__(self, error: str, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.status = status


class TokenServer:
    """The state and ASGI app of the test token endpoint. Knobs are plain attributes tests may change."""

    def __init__(
        self,
        clients: Sequence[RegisteredClient],
        *,
        expires_in: int = 300,
        granted_scope: str | None = None,
        include_scope: bool = True,
        upstream_fhir_url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = {c.client_id: c for c in clients}
        self.expires_in = expires_in
        self.granted_scope = granted_scope
        self.include_scope = include_scope
        self.upstream_fhir_url = upstream_fhir_url.rstrip("/") if upstream_fhir_url else None
        self.clock = clock
        self.base_url = ""
        self.rejections: list[str] = []
        self.proxied_requests = 0
        self.requested_scopes: list[list[str]] = []  # the scope of each token request, split
        self._token_requests = 0
        self._lock = threading.Lock()
        self._seen_jti: dict[str, float] = {}
        self._issued: dict[str, _Issued] = {}
        self._proxy_client: httpx2.AsyncClient | None = None
        self.app = Starlette(
            routes=[
                Route("/.well-known/smart-configuration", self._smart_configuration, methods=["GET"]),
                Route("/fhir/.well-known/smart-configuration", self._smart_configuration, methods=["GET"]),
                Route("/auth/token", self._token, methods=["POST"]),
                Route("/introspect", self._introspect_http, methods=["POST"]),
                Route("/jwks-registered/{client_id}", self._registered_jwks, methods=["GET"]),
                Route("/fhir/{path:path}", self._fhir, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
            ],
            lifespan=self._lifespan,
        )

    # -- what tests read -------------------------------------------------------------------------
    @property
    def token_url(self) -> str:
        return f"{self.base_url}/auth/token"

    @property
    def fhir_base_url(self) -> str:
        return f"{self.base_url}/fhir"

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def expire(self, token: str) -> None:
        """Make ``token`` answer as expired from now on (so the FHIR proxy returns 401)."""
        with self._lock:
            issued = self._issued.get(token)
            if issued is not None:
                issued.revoked = True

    def introspect(self, token: str) -> bool:
        """True when ``token`` was issued here, is not expired and was not expired by ``expire``."""
        with self._lock:
            issued = self._issued.get(token)
            return issued is not None and not issued.revoked and self.clock() < issued.expires_at

    # -- the app ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> Any:
        async with httpx2.AsyncClient(timeout=PROXY_TIMEOUT, trust_env=False) as client:
            self._proxy_client = client
            yield

    async def _smart_configuration(self, request: Request) -> Response:
        return JSONResponse(
            {
                "token_endpoint": self.token_url,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
                "token_endpoint_auth_signing_alg_values_supported": ALGORITHMS,
                "scopes_supported": ["system/*.rs", "system/*.read"],
                "introspection_endpoint": f"{self.base_url}/introspect",
                "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
            }
        )

    async def _registered_jwks(self, request: Request) -> Response:
        client = self.clients.get(request.path_params["client_id"])
        if client is None or client.jwks is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return JSONResponse(dict(client.jwks))

    async def _token(self, request: Request) -> Response:
        with self._lock:
            self._token_requests += 1
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            if fields.get("grant_type") != "client_credentials":
                raise _OAuthError("unsupported_grant_type")
            client = self._authenticate(request, fields)
            requested = fields.get("scope", "")
            with self._lock:
                self.requested_scopes.append(requested.split())
            scope = self.granted_scope if self.granted_scope is not None else requested
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._issued[token] = _Issued(client.client_id, self.clock() + self.expires_in, scope)
        except _OAuthError as exc:
            with self._lock:
                self.rejections.append(exc.error)
            return JSONResponse({"error": exc.error}, status_code=exc.status)
        body: dict[str, Any] = {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}
        if self.include_scope:
            body["scope"] = scope
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate(self, request: Request, fields: Mapping[str, str]) -> RegisteredClient:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            return self._authenticate_basic(header[6:])
        if "client_assertion" in fields:
            if fields.get("client_assertion_type") != ASSERTION_TYPE:
                raise _OAuthError("invalid_client", 401)
            return self._authenticate_assertion(fields["client_assertion"])
        raise _OAuthError("invalid_client", 401)

    def _authenticate_basic(self, encoded: str) -> RegisteredClient:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except ValueError as exc:
            raise _OAuthError("invalid_client", 401) from exc
        user, sep, password = decoded.partition(":")
        client_id = urllib.parse.unquote_plus(user)
        secret = urllib.parse.unquote_plus(password)
        client = self.clients.get(client_id)
        if not sep or client is None or client.secret is None:
            raise _OAuthError("invalid_client", 401)
        if not secrets.compare_digest(client.secret.encode(), secret.encode()):
            raise _OAuthError("invalid_client", 401)
        return client

    def _authenticate_assertion(self, assertion: str) -> RegisteredClient:
        # Find the client from the (not yet trusted) issuer, then verify against that client's JWKS only.
        client = self.clients.get(str(_unverified_claims(assertion).get("iss", "")))
        if client is None or client.jwks is None:
            raise _OAuthError("invalid_client", 401)
        try:
            keys = KeySet.import_key_set(dict(client.jwks))  # type: ignore[arg-type]
            token = jwt.decode(assertion, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise _OAuthError("invalid_client", 401) from exc
        if token.header.get("alg") not in ALGORITHMS or not token.header.get("kid"):
            raise _OAuthError("invalid_client", 401)
        now = int(self.clock())
        registry = JWTClaimsRegistry(
            now=lambda: now,
            iss={"essential": True, "value": client.client_id},
            sub={"essential": True, "value": client.client_id},
            aud={"essential": True, "value": self.token_url},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(token.claims)
        except JoseError as exc:
            raise _OAuthError("invalid_client", 401) from exc
        exp = token.claims["exp"]
        jti = token.claims["jti"]
        if not isinstance(exp, int) or exp > now + MAX_ASSERTION_LIFETIME:
            raise _OAuthError("invalid_client", 401)
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise _OAuthError("invalid_client", 401)
        with self._lock:
            self._seen_jti = {k: v for k, v in self._seen_jti.items() if v >= now}
            if jti in self._seen_jti:
                raise _OAuthError("invalid_client", 401)
            self._seen_jti[jti] = exp
        return client

    async def _introspect_http(self, request: Request) -> Response:
        form = await request.form()
        token = form.get("token")
        return JSONResponse({"active": isinstance(token, str) and self.introspect(token)})

    async def _fhir(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not token or not self.introspect(token):
            return JSONResponse(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        with self._lock:
            self.proxied_requests += 1
        if self.upstream_fhir_url is None or self._proxy_client is None:
            return JSONResponse({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
        url = f"{self.upstream_fhir_url}/{request.path_params['path']}"
        forwarded = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _HOP_HEADERS | {"host", "authorization"}
        }
        upstream = await self._proxy_client.request(
            request.method, url, params=request.url.query, headers=forwarded, content=await request.body()
        )
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(upstream.content, status_code=upstream.status_code, headers=headers)


def _unverified_claims(assertion: str) -> dict[str, Any]:
    try:
        data = json.loads(jws.extract_compact(assertion.encode()).payload)
    except (JoseError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def start_token_server(
    clients: Sequence[RegisteredClient],
    *,
    expires_in: int = 300,
    granted_scope: str | None = None,
    include_scope: bool = True,
    upstream_fhir_url: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Iterator[TokenServer]:
    """Run a ``TokenServer`` on a free loopback port in a thread; yields once it accepts requests."""
    server_state = TokenServer(
        clients,
        expires_in=expires_in,
        granted_scope=granted_scope,
        include_scope=include_scope,
        upstream_fhir_url=upstream_fhir_url,
        clock=clock,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server_state.base_url = f"http://127.0.0.1:{port}"
    config = uvicorn.Config(server_state.app, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="token-server", daemon=True)
    thread.start()
    try:
        ready = threading.Event()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("token server exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("token server did not start in time")
            ready.wait(STARTUP_POLL)
        yield server_state
    finally:
        server.should_exit = True
        thread.join(STARTUP_TIMEOUT)
        sock.close()
