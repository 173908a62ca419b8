"""HTTP guards: credentials in the query → 400, SDK-side rejections reported, transport security."""

from __future__ import annotations

import httpx2
import pytest
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.types import Receive, Scope, Send

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.http import (
    RejectTokenInQuery,
    ReportAuthRejections,
    protect_http_app,
    transport_security_for,
)


class Rejections:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def __call__(self, reason: str, subject_id: str | None) -> None:
        self.seen.append((reason, subject_id))


class App:
    """An inner app that records calls and answers with a chosen status."""

    def __init__(self, status: int = 200, www_authenticate: bytes | None = None, user=None) -> None:
        self.calls = 0
        self.status = status
        self.www_authenticate = www_authenticate
        self.user = user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        if self.user is not None:
            scope["user"] = self.user
        headers = [(b"www-authenticate", self.www_authenticate)] if self.www_authenticate else []
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def _client(app) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1")


@pytest.mark.parametrize("param", ["access_token", "token", "api_key", "Access_Token"])
async def test_a_credential_in_the_query_string_is_a_400_and_is_reported(param):
    inner, rejections = App(), Rejections()
    async with _client(RejectTokenInQuery(inner, rejections)) as client:
        response = await client.post(f"/mcp?x=1&{param}=eyJ.abc.def", headers={"Authorization": "Bearer t"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_request"'
    assert "eyJ" not in response.text
    assert inner.calls == 0
    assert rejections.seen == [("token_in_query", None)]


async def test_other_query_parameters_pass_through():
    inner, rejections = App(), Rejections()
    async with _client(RejectTokenInQuery(inner, rejections)) as client:
        response = await client.get("/mcp?session=abc&tokens=1")
    assert response.status_code == 200 and inner.calls == 1 and rejections.seen == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, [("token_missing", None)]),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, [("token_malformed", None)]),
        ({"Authorization": "Bearer abc"}, []),
    ],
)
async def test_missing_or_non_bearer_credentials_on_the_protected_path_are_reported(headers, expected):
    rejections = Rejections()
    async with _client(ReportAuthRejections(App(status=401), rejections)) as client:
        await client.post("/mcp", headers=headers)
    assert rejections.seen == expected


async def test_unprotected_paths_are_not_reported():
    rejections = Rejections()
    async with _client(ReportAuthRejections(App(), rejections)) as client:
        await client.get("/.well-known/oauth-protected-resource/mcp")
    assert rejections.seen == []


async def test_the_sdks_insufficient_scope_403_is_reported_with_the_subject():
    access = AccessToken(token="t", client_id="c", scopes=[], subject="agent-1")
    inner = App(
        status=403, www_authenticate=b'Bearer error="insufficient_scope"', user=AuthenticatedUser(access)
    )
    rejections = Rejections()
    async with _client(protect_http_app(inner, rejections)) as client:
        response = await client.post("/mcp", headers={"Authorization": "Bearer t"})
    assert response.status_code == 403
    assert rejections.seen == [("insufficient_scope", "agent-1")]


def test_loopback_binds_allow_loopback_hosts_and_origins_on_the_port():
    settings = transport_security_for("127.0.0.1", 8000)
    assert settings.enable_dns_rebinding_protection
    assert "127.0.0.1:8000" in settings.allowed_hosts and "localhost:8000" in settings.allowed_hosts
    assert "http://localhost:8000" in settings.allowed_origins
    assert not any("*" in h for h in settings.allowed_hosts)


def test_wildcard_binds_need_explicit_hosts():
    with pytest.raises(ConfigError) as info:
        transport_security_for("0.0.0.0", 8000)
    assert info.value.key == "server.allowed_hosts"
    settings = transport_security_for("0.0.0.0", 8000, ["https://app.example"], ["mcp.example:443"])
    assert settings.allowed_hosts == ["mcp.example:443"] and settings.allowed_origins == [
        "https://app.example"
    ]


def test_wildcard_origins_are_refused():
    with pytest.raises(ConfigError) as info:
        transport_security_for("127.0.0.1", 8000, ["*"])
    assert info.value.key == "server.allowed_origins"
