"""ASGI pieces around the SDK's streamable HTTP app.

The SDK already does the bearer plumbing (``BearerAuthBackend``, 401/403 with
``WWW-Authenticate … resource_metadata=…``, RFC 9728 metadata routes) and, through
``TransportSecuritySettings``, Host/Origin checks against DNS rebinding. It turns those
checks on by itself only when ``host`` is a loopback name; ``transport_security_for``
builds them explicitly for any bind address. What the SDK lacks, and this module adds:

- ``RejectTokenInQuery``: a credential in the query string (``access_token``, ``token``,
  ``api_key``, any case) → 400 ``{"error": "invalid_request"}`` with
  ``WWW-Authenticate: Bearer error="invalid_request"``, reported as ``token_in_query``.
  The request never reaches the app, so the credential is never used or logged by us.
- ``ReportAuthRejections``: the SDK answers a missing credential or a short scope without
  asking the verifier, so the audit hook would never hear of them. This middleware reports
  ``token_missing`` (no ``Authorization``), ``token_malformed`` (not ``Bearer <token>``) and
  ``insufficient_scope`` (the SDK's 403) on the protected path, then lets the SDK answer.

- ``ReportAuthRejections`` also fixes the SDK's challenge for a request with no credentials.
  The SDK answers every 401 with ``WWW-Authenticate: Bearer error="invalid_token", …``. RFC 6750
  §3.1 says that when a request lacks any authentication information (no ``Authorization``
  header, or a scheme other than Bearer), the challenge carries no error code or other error
  information. For those requests the 401 keeps ``Bearer`` and ``resource_metadata`` (RFC 9728)
  only, with a body that names no error; ``invalid_token`` stays for a bearer token that fails.

``protect_http_app(app, verifier.reject)`` wraps both in the right order.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import parse_qsl

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.verifier import OnReject

__all__ = [
    "QUERY_CREDENTIAL_PARAMS",
    "RejectTokenInQuery",
    "ReportAuthRejections",
    "protect_http_app",
    "transport_security_for",
]

QUERY_CREDENTIAL_PARAMS: Final = frozenset({"access_token", "token", "api_key"})
DEFAULT_PROTECTED_PATHS: Final = ("/mcp",)
_LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "[::1]")
_WILDCARD_BINDS: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names, not a bind
_CHALLENGE_PARAM: Final = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)="((?:[^"\\]|\\.)*)"')
_ERROR_PARAMS: Final = frozenset({"error", "error_description", "error_uri"})
NO_CREDENTIALS_BODY: Final = json.dumps({"message": "authentication required"}).encode()


class RejectTokenInQuery:
    """400 for any HTTP request carrying a credential in its query string."""

    def __init__(
        self, app: ASGIApp, on_reject: OnReject | None = None, params: Iterable[str] = QUERY_CREDENTIAL_PARAMS
    ) -> None:
        self.app = app
        self.on_reject = on_reject
        self.params = frozenset(p.lower() for p in params)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._has_credential(scope.get("query_string", b"")):
            if self.on_reject is not None:
                await self.on_reject("token_in_query", None)
            body = json.dumps(
                {"error": "invalid_request", "error_description": "credentials must not be sent in the query"}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer error="invalid_request"'),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _has_credential(self, query: bytes) -> bool:
        if not query:
            return False
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        return any(name.lower() in self.params for name, _ in pairs)


class ReportAuthRejections:
    """Tell ``on_reject`` about the rejections the SDK makes without calling the verifier."""

    def __init__(
        self, app: ASGIApp, on_reject: OnReject, protected_paths: Iterable[str] = DEFAULT_PROTECTED_PATHS
    ) -> None:
        self.app = app
        self.on_reject = on_reject
        self.protected_paths = frozenset(p.rstrip("/") or "/" for p in protected_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("path", "").rstrip("/") or "/") not in self.protected_paths:
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), None)
        no_credentials = authorization is None or not authorization.lower().startswith(b"bearer ")
        if authorization is None:
            await self.on_reject("token_missing", None)
        elif no_credentials:  # the SDK's own test for a bearer token; else the verifier reports
            await self.on_reject("token_malformed", None)
        challenge_rewritten = False

        async def reporting_send(message: Message) -> None:
            nonlocal challenge_rewritten
            if message["type"] == "http.response.start":
                if message["status"] == 403 and _is_scope_error(message):
                    user = scope.get("user")
                    subject = user.access_token.subject if isinstance(user, AuthenticatedUser) else None
                    await self.on_reject("insufficient_scope", subject)
                elif message["status"] == 401 and no_credentials:
                    challenge_rewritten = True
                    message = _without_error_information(message)
            elif message["type"] == "http.response.body" and challenge_rewritten:
                if message.get("more_body", False):
                    return  # the SDK's error body is replaced as a whole
                message = {"type": "http.response.body", "body": NO_CREDENTIALS_BODY}
            await send(message)

        await self.app(scope, receive, reporting_send)


def _without_error_information(message: Message) -> Message:
    """The SDK's 401 start message, its challenge reduced to ``Bearer`` and its non-error parameters."""
    headers = []
    for name, value in message.get("headers", []):
        lowered = name.lower()
        if lowered == b"www-authenticate" and value[:6].lower() == b"bearer":
            kept = [
                f'{key}="{val}"'
                for key, val in _CHALLENGE_PARAM.findall(value.decode("latin-1"))
                if key.lower() not in _ERROR_PARAMS
            ]
            value = ("Bearer " + ", ".join(kept) if kept else "Bearer").encode("latin-1")
        elif lowered == b"content-length":
            value = str(len(NO_CREDENTIALS_BODY)).encode()
        headers.append((name, value))
    return {**message, "headers": headers}


def _is_scope_error(message: Message) -> bool:
    return any(
        k.lower() == b"www-authenticate" and b'error="insufficient_scope"' in v
        for k, v in message.get("headers", [])
    )


def protect_http_app(
    app: ASGIApp, on_reject: OnReject, protected_paths: Iterable[str] = DEFAULT_PROTECTED_PATHS
) -> ASGIApp:
    """The SDK app wrapped with the query-credential guard (outermost) and the rejection reporter."""
    return RejectTokenInQuery(ReportAuthRejections(app, on_reject, protected_paths), on_reject)


def transport_security_for(
    host: str, port: int, allowed_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = ()
) -> TransportSecuritySettings:
    """DNS-rebinding protection (Host and Origin allow-lists) for the address we bind.

    Loopback binds allow the loopback names on ``port``. A wildcard bind (``0.0.0.0``, ``::``)
    needs explicit ``allowed_hosts`` (the public ``host:port`` names clients use).
    Origins are exact (``scheme://host[:port]``); ``*`` is refused.
    """
    if not 0 < port < 65536:
        raise ConfigError("server.port", "must be between 1 and 65535")
    hosts = list(allowed_hosts)
    if _is_loopback(host):
        hosts += [f"{name}:{port}" for name in _LOOPBACK_NAMES]
    elif host not in _WILDCARD_BINDS:
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not hosts:
        raise ConfigError("server.allowed_hosts", "is required when binding to all interfaces")
    origins = list(allowed_origins)
    if any("*" in o for o in origins):
        raise ConfigError("server.allowed_origins", "wildcards are not allowed")
    if _is_loopback(host):
        origins += [f"http://{name}:{port}" for name in _LOOPBACK_NAMES]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
