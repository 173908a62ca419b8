"""The MCP server as an OAuth 2.1 resource server, end to end over real HTTP on loopback.

A real MCPServer (streamable HTTP, under uvicorn) with AgentTokenVerifier and the query-token
guard, a real test issuer serving metadata and JWKS, and the official MCP client. Every
rejection must carry the right status and reach ``on_reject`` with the right reason.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.testbed` is not importable under --import-mode=importlib otherwise
    sys.path.insert(0, _ROOT)

from mcp_fhir.agent_auth import (  # noqa: E402
    AgentAuthSettings,
    ApiKeyEntry,
    JwksSettings,
    auth_settings_for,
    build_token_verifier,
    generate_api_key,
    protect_http_app,
    subject_from_access_token,
)
from tests.testbed.issuer import ServerThread, TestIssuer, bind_loopback  # noqa: E402

pytestmark = pytest.mark.integration

REQUIRED_SCOPE = "mcp.read"
MIN_REFRESH = 0.001
API_KEY, API_KEY_HASH = generate_api_key()
KEY_CLAIMS = {"roles": ["nurse"], "patient": "pat-au-001", "purpose_of_use": "treatment"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Rejections:
    """The ``on_reject`` hook: records (reason, subject_id) as the lead's audit writer would."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def __call__(self, reason: str, subject_id: str | None) -> None:
        self.seen.append((reason, subject_id))


@dataclass
class Stack:
    issuer: TestIssuer
    mcp_url: str
    base_url: str
    rejections: Rejections


def _build_server(settings: AgentAuthSettings, verifier: Any) -> MCPServer:
    server = MCPServer("auth-probe", token_verifier=verifier, auth=auth_settings_for(settings))

    @server.tool()
    def whoami() -> dict[str, Any]:
        """The authenticated caller, as the policy would see it."""
        access = get_access_token()
        if access is None:
            raise RuntimeError("no access token in context")
        return subject_from_access_token(access).to_input()

    return server


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    sock = bind_loopback()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    mcp_url = f"{base_url}/mcp"
    rejections = Rejections()
    with TestIssuer(default_audience=mcp_url) as issuer:
        settings = AgentAuthSettings(
            issuer=issuer.issuer,
            audience=mcp_url,
            required_scopes=(REQUIRED_SCOPE,),
            api_keys=(
                ApiKeyEntry(id="ward-bot", hash=API_KEY_HASH, claims=KEY_CLAIMS, scopes=(REQUIRED_SCOPE,)),
            ),
            jwks=JwksSettings(min_refresh_seconds=MIN_REFRESH),  # small floor so rotation shows up at once
        )
        jwks_client = httpx2.AsyncClient()  # long-lived; used only on the server thread's loop
        verifier = build_token_verifier(settings, jwks_client, rejections)
        app = protect_http_app(_build_server(settings, verifier).streamable_http_app(), rejections)
        with ServerThread(app, sock=sock):
            yield Stack(issuer=issuer, mcp_url=mcp_url, base_url=base_url, rejections=rejections)


async def _post(stack: Stack, authorization: str | None, url: str | None = None) -> httpx2.Response:
    headers = dict(MCP_HEADERS)
    if authorization is not None:
        headers["Authorization"] = authorization
    async with httpx2.AsyncClient(timeout=10) as client:
        return await client.post(url or stack.mcp_url, json=INITIALIZE, headers=headers)


def _bad_tokens(issuer: TestIssuer) -> dict[str, tuple[str, str | None]]:
    """name → (token, expected reason); subject ids appear only for verified signatures."""
    return {
        "alg_none": (issuer.forge_alg_none(scopes=[REQUIRED_SCOPE]), "alg_not_allowed"),
        "hs256_public_key": (issuer.forge_hs256_with_public_key(scopes=[REQUIRED_SCOPE]), "alg_not_allowed"),
        "unknown_kid": (issuer.forge_unknown_kid(scopes=[REQUIRED_SCOPE]), "unknown_kid"),
        "foreign_key": (issuer.forge_foreign_key(scopes=[REQUIRED_SCOPE]), "bad_signature"),
        "wrong_issuer": (issuer.forge_wrong_issuer(scopes=[REQUIRED_SCOPE]), "wrong_issuer"),
        "wrong_audience": (issuer.forge_wrong_audience(scopes=[REQUIRED_SCOPE]), "wrong_audience"),
        "expired": (issuer.forge_expired(scopes=[REQUIRED_SCOPE]), "token_expired"),
        "not_yet_valid": (issuer.forge_not_yet_valid(scopes=[REQUIRED_SCOPE]), "token_not_yet_valid"),
        "unknown_api_key": ("mfk_" + "A" * 43, "api_key_unknown"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "alg_none",
        "hs256_public_key",
        "unknown_kid",
        "foreign_key",
        "wrong_issuer",
        "wrong_audience",
        "expired",
        "not_yet_valid",
        "unknown_api_key",
    ],
)
async def test_bad_credentials_get_401_with_resource_metadata_and_reach_on_reject(stack, case):
    token, reason = _bad_tokens(stack.issuer)[case]
    before = len(stack.rejections.seen)

    response = await _post(stack, f"Bearer {token}")

    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert f'resource_metadata="{stack.base_url}/.well-known/oauth-protected-resource/mcp"' in challenge
    assert [r for r, _ in stack.rejections.seen[before:]] == [reason]


async def test_a_missing_token_gets_401_and_is_reported_as_token_missing(stack):
    before = len(stack.rejections.seen)
    response = await _post(stack, None)
    assert response.status_code == 401
    assert "resource_metadata=" in response.headers["www-authenticate"]
    assert stack.rejections.seen[before:] == [("token_missing", None)]


async def test_a_non_bearer_scheme_gets_401_and_is_reported_as_malformed(stack):
    before = len(stack.rejections.seen)
    response = await _post(stack, "Basic dXNlcjpwYXNz")
    assert response.status_code == 401
    assert stack.rejections.seen[before:] == [("token_malformed", None)]


async def test_a_token_in_the_query_string_gets_400_and_is_reported(stack):
    token = stack.issuer.mint("agent-1", scopes=[REQUIRED_SCOPE])
    before = len(stack.rejections.seen)
    response = await _post(stack, None, url=f"{stack.mcp_url}?access_token={token}")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_request"'
    assert stack.rejections.seen[before:] == [("token_in_query", None)]


async def test_a_valid_token_without_the_required_scope_gets_403_insufficient_scope(stack):
    token = stack.issuer.mint("agent-5", scopes=["something.else"])
    before = len(stack.rejections.seen)
    response = await _post(stack, f"Bearer {token}")
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert "resource_metadata=" in response.headers["www-authenticate"]
    assert stack.rejections.seen[before:] == [("insufficient_scope", "agent-5")]


async def test_protected_resource_metadata_names_the_issuer_and_this_resource(stack):
    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.get(f"{stack.base_url}/.well-known/oauth-protected-resource/mcp")
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["resource"] == stack.mcp_url
    assert [a.rstrip("/") for a in metadata["authorization_servers"]] == [stack.issuer.issuer]
    assert metadata["scopes_supported"] == [REQUIRED_SCOPE]


async def _whoami(stack: Stack, credential: str) -> dict[str, Any]:
    http_client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"}, timeout=30)
    async with http_client, Client(streamable_http_client(stack.mcp_url, http_client=http_client)) as client:
        result = await client.call_tool("whoami", {})
    assert not result.is_error
    return result.structured_content


async def test_a_valid_jwt_reaches_the_tool_with_its_subject(stack):
    token = stack.issuer.mint(  # a delegation token: agent-1 acting for dr-a (RFC 8693)
        "dr-a",
        scopes=[REQUIRED_SCOPE],
        claims={"roles": ["nurse"], "act": {"sub": "agent-1"}, "azp": "cli-1"},
    )
    before = len(stack.rejections.seen)
    subject = await _whoami(stack, token)
    assert (subject["id"], subject["authn"], subject["on_behalf_of"]) == ("agent-1", "oauth", "dr-a")
    assert subject["claims"]["roles"] == ["nurse"] and subject["scopes"] == [REQUIRED_SCOPE]
    assert stack.rejections.seen[before:] == []


async def test_a_jwt_signed_with_a_freshly_rotated_es256_key_is_accepted(stack):
    old_kid = stack.issuer.signing_kid
    await _whoami(stack, stack.issuer.mint("agent-1", scopes=[REQUIRED_SCOPE]))  # the old set is cached now
    fetches = stack.issuer.jwks_requests
    new_kid = stack.issuer.rotate("ES256")
    try:
        subject = await _whoami(stack, stack.issuer.mint("agent-ec", scopes=[REQUIRED_SCOPE]))
    finally:
        stack.issuer.use_key(old_kid)
    assert subject["id"] == "agent-ec"
    assert new_kid.startswith("es256-") and stack.issuer.jwks_requests == fetches + 1


async def test_a_valid_api_key_reaches_the_tool_with_its_subject(stack):
    subject = await _whoami(stack, API_KEY)
    assert (subject["id"], subject["authn"], subject["claims"]) == ("ward-bot", "api_key", KEY_CLAIMS)
