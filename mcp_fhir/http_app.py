"""The streamable HTTP app: the SDK's MCP endpoint, guarded, plus health and our public JWKS."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from mcp_fhir.agent_auth.http import protect_http_app, transport_security_for
from mcp_fhir.config import Settings
from mcp_fhir.ehr.keys import public_jwks
from mcp_fhir.ehr.smart import SmartBackendAuth
from mcp_fhir.health import readiness
from mcp_fhir.logs import RequestContextMiddleware
from mcp_fhir.server import SidecarServer


def build_http_app(settings: Settings, server: SidecarServer) -> Any:
    """The ASGI app `serve` runs: Origin/Host checks, no tokens in query strings, health and JWKS routes."""
    holder = server.app_holder

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    @server.custom_route("/readyz", methods=["GET"])
    async def readyz(request: Request) -> JSONResponse:
        report = await readiness(holder.get("app"), expected_revision=settings.opa.expected_revision)
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @server.custom_route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(request: Request) -> JSONResponse:
        """Our SMART Backend Services public keys, for the EHR to register."""
        app = holder.get("app")
        keys: dict[str, Any] = {"keys": []}
        for client in app.backends.values() if app else ():
            tokens = getattr(client, "token_provider", None)
            if isinstance(tokens, SmartBackendAuth):
                keys["keys"] += tokens.public_jwks()["keys"]
        return JSONResponse(keys)

    app: Any = server.streamable_http_app(
        streamable_http_path=settings.server.path,
        stateless_http=settings.server.stateless,
        json_response=settings.server.json_response,
        transport_security=transport_security_for(
            settings.server.host,
            settings.server.port,
            settings.server.allowed_origins,
            settings.server.allowed_hosts,
        ),
        host=settings.server.host,
    )
    on_reject = server.on_reject
    if on_reject:
        app = protect_http_app(app, on_reject, protected_paths=[settings.server.path])
    return RequestContextMiddleware(app, mcp_path=settings.server.path)


__all__ = ["build_http_app", "public_jwks"]
