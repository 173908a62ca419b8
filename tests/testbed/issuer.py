"""A small, real OAuth authorization-server stand-in for agent-auth tests.

``TestIssuer`` generates RSA and EC signing keys, serves
``/.well-known/oauth-authorization-server`` and ``/jwks.json`` on a free loopback port
(uvicorn in a thread), rotates keys, mints access tokens, and forges the bad ones a
resource server must refuse (``alg: none``, HS256 keyed with the RSA public key PEM,
unknown ``kid``, wrong issuer or audience, expired, not yet valid).

    with TestIssuer() as issuer:
        token = issuer.mint("agent-1", aud="http://127.0.0.1:8000/mcp", scopes=["mcp.read"])

``ServerThread`` runs any ASGI app the same way; it binds the socket before starting
uvicorn, so the port accepts connections (they queue in the backlog) the moment the
context is entered: no readiness sleep is needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

SHUTDOWN_TIMEOUT: Final = 10.0
DEFAULT_TOKEN_LIFETIME: Final = 300
EVIL_ISSUER: Final = "http://127.0.0.1:1/not-the-issuer"


def bind_loopback() -> socket.socket:
    """A listening socket on a free loopback port (pass it to ``ServerThread``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class ServerThread:
    """Serve an ASGI app with uvicorn on a pre-bound free loopback port, in a daemon thread.

    Pass ``sock`` (from ``bind_loopback``) when the app must know its own port before it is built.
    """

    def __init__(self, app: ASGIApp, *, lifespan: str = "auto", sock: socket.socket | None = None) -> None:
        self._sock = sock or bind_loopback()
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(SHUTDOWN_TIMEOUT)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("uvicorn did not shut down in time")


@dataclass
class _Key:
    kid: str
    alg: str
    private: Any
    public_jwk: dict[str, Any]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _make_key(kid: str, alg: str) -> _Key:
    if alg.startswith(("RS", "PS")):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    elif alg in ("ES256", "ES384", "ES512"):
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private = ec.generate_private_key(curve)
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    else:
        raise ValueError(f"unsupported test key algorithm {alg}")
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return _Key(kid=kid, alg=alg, private=private, public_jwk=jwk)


class TestIssuer:
    """An authorization server for tests: metadata, JWKS, rotation, minting and forging."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, *, default_audience: str | None = None, algorithms: Sequence[str] = ("RS256", "ES256")
    ):
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()
        self.jwks_requests = 0
        self.metadata_requests = 0
        self.default_audience = default_audience
        for alg in algorithms:
            self.add_key(alg)
        self.signing_kid = next(iter(self._keys))
        app = Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", self._metadata),
                Route("/jwks.json", self._jwks),
            ]
        )
        self._server = ServerThread(app, lifespan="off")
        self.url = self._server.url
        self.issuer = self.url
        self.jwks_url = f"{self.url}/jwks.json"

    def __enter__(self) -> TestIssuer:
        self._server.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.__exit__(exc_type, exc, tb)

    # --- HTTP endpoints -------------------------------------------------------------------

    async def _metadata(self, request: Request) -> JSONResponse:
        with self._lock:
            self.metadata_requests += 1
        return JSONResponse(
            {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_url,
                "token_endpoint": f"{self.url}/token",
                "response_types_supported": ["code"],
                "grant_types_supported": ["client_credentials"],
            }
        )

    async def _jwks(self, request: Request) -> JSONResponse:
        with self._lock:
            self.jwks_requests += 1
            keys = [k.public_jwk for k in self._keys.values()]
        return JSONResponse({"keys": keys})

    # --- keys and rotation ----------------------------------------------------------------

    def add_key(self, alg: str = "RS256", kid: str | None = None) -> str:
        """Publish a new key in the JWKS; returns its kid (signing does not switch to it)."""
        kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        key = _make_key(kid, alg)
        with self._lock:
            self._keys[kid] = key
        return kid

    def use_key(self, kid: str) -> None:
        """Sign from now on with this (published) key."""
        if kid not in self._keys:
            raise KeyError(kid)
        self.signing_kid = kid

    def remove_key(self, kid: str) -> None:
        """Stop publishing a key (tokens signed with it become unverifiable)."""
        with self._lock:
            del self._keys[kid]

    def rotate(self, alg: str = "RS256") -> str:
        """Add a key and sign with it; the old keys stay published."""
        kid = self.add_key(alg)
        self.use_key(kid)
        return kid

    def public_jwks(self) -> dict[str, Any]:
        """The JWKS document, as served on ``/jwks.json``."""
        with self._lock:
            return {"keys": [dict(k.public_jwk) for k in self._keys.values()]}

    def kid_for(self, alg: str) -> str:
        """The first published kid for an algorithm."""
        return next(k.kid for k in self._keys.values() if k.alg == alg)

    def public_pem(self, kid: str | None = None) -> bytes:
        """The PEM of a key's public half (what an HS256 forgery uses as its secret)."""
        key = self._keys[kid or self.signing_kid]
        return key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # --- minting --------------------------------------------------------------------------

    def claims(
        self,
        sub: str = "agent-1",
        *,
        aud: str | Iterable[str] | None = None,
        scopes: Iterable[str] = (),
        claims: Mapping[str, Any] | None = None,
        exp_in: float | None = DEFAULT_TOKEN_LIFETIME,
        nbf_in: float | None = None,
        iat_in: float = 0,
        iss: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """The payload ``mint`` would sign."""
        now = time.time() if now is None else now
        audience = aud if aud is not None else self.default_audience
        payload: dict[str, Any] = {
            "iss": iss if iss is not None else self.issuer,
            "sub": sub,
            "aud": audience if isinstance(audience, str) or audience is None else list(audience),
            "iat": int(now + iat_in),
            "jti": uuid.uuid4().hex,
        }
        if payload["aud"] is None:
            del payload["aud"]
        scope_list = list(scopes)
        if scope_list:
            payload["scope"] = " ".join(scope_list)
        if exp_in is not None:
            payload["exp"] = int(now + exp_in)
        if nbf_in is not None:
            payload["nbf"] = int(now + nbf_in)
        payload.update(claims or {})
        return payload

    def mint(
        self,
        sub: str = "agent-1",
        *,
        aud: str | Iterable[str] | None = None,
        scopes: Iterable[str] = (),
        claims: Mapping[str, Any] | None = None,
        exp_in: float | None = DEFAULT_TOKEN_LIFETIME,
        nbf_in: float | None = None,
        iat_in: float = 0,
        iss: str | None = None,
        kid: str | None = None,
        alg: str | None = None,
        headers: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """A signed access token. ``kid`` picks the signing key (default: the current one)."""
        payload = self.claims(
            sub,
            aud=aud,
            scopes=scopes,
            claims=claims,
            exp_in=exp_in,
            nbf_in=nbf_in,
            iat_in=iat_in,
            iss=iss,
            now=now,
        )
        signing_kid = kid or self.signing_kid
        key = self._keys[signing_kid]
        header = {"kid": signing_kid, "typ": "at+jwt", **(headers or {})}
        header = {name: value for name, value in header.items() if value is not None}  # None drops a field
        return jwt.encode(payload, key.private, algorithm=alg or key.alg, headers=header)

    # --- forgeries ------------------------------------------------------------------------

    def forge_alg_none(self, sub: str = "agent-1", **claim_args: Any) -> str:
        """An unsigned token (``alg: none``) with otherwise perfect claims."""
        header = {"alg": "none", "typ": "at+jwt", "kid": self.signing_kid}
        payload = self.claims(sub, **claim_args)
        return f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}."

    def forge_hs256_with_public_key(self, sub: str = "agent-1", **claim_args: Any) -> str:
        """HS256 keyed with the RSA public key PEM: the classic algorithm-confusion attack."""
        kid = self.kid_for("RS256")
        header = {"alg": "HS256", "typ": "at+jwt", "kid": kid}
        payload = self.claims(sub, **claim_args)
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(payload).encode())}"
        signature = hmac.new(self.public_pem(kid), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(signature)}"

    def forge_unknown_kid(self, sub: str = "agent-1", **claim_args: Any) -> str:
        """Correctly signed, but the header names a kid the JWKS does not publish."""
        return self.mint(sub, headers={"kid": "kid-nobody-published"}, **claim_args)

    def forge_foreign_key(self, sub: str = "agent-1", **claim_args: Any) -> str:
        """Claims a published kid but is signed with a key the issuer never published."""
        stranger = _make_key(self.signing_kid, self._keys[self.signing_kid].alg)
        payload = self.claims(sub, **claim_args)
        header = {"kid": self.signing_kid, "typ": "at+jwt"}
        return jwt.encode(payload, stranger.private, algorithm=stranger.alg, headers=header)

    def forge_wrong_issuer(self, sub: str = "agent-1", **claim_args: Any) -> str:
        return self.mint(sub, iss=EVIL_ISSUER, **claim_args)

    def forge_wrong_audience(self, sub: str = "agent-1", **claim_args: Any) -> str:
        return self.mint(sub, aud="http://127.0.0.1:1/some-other-resource", **claim_args)

    def forge_expired(self, sub: str = "agent-1", **claim_args: Any) -> str:
        return self.mint(sub, exp_in=-3600, iat_in=-7200, **claim_args)

    def forge_not_yet_valid(self, sub: str = "agent-1", **claim_args: Any) -> str:
        return self.mint(sub, nbf_in=3600, exp_in=7200, **claim_args)
