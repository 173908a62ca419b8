"""RFC 6750 §3.1 over real HTTP: no credentials → a bare Bearer challenge; a failing token → invalid_token.

A request that lacks any authentication information (no ``Authorization`` header, or a scheme
other than Bearer) gets ``401`` with ``WWW-Authenticate: Bearer resource_metadata="…"`` and no
``error``, ``error_description`` or ``error_uri``, in the header or the body. A bearer token
that fails still gets ``error="invalid_token"``. The server is the SDK's streamable HTTP app
behind ``protect_http_app``, served by uvicorn on loopback and called with an HTTP client.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from mcp.server.mcpserver import MCPServer

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.testbed` is not importable under --import-mode=importlib otherwise
    sys.path.insert(0, _ROOT)

from mcp_fhir.agent_auth import AgentAuthSettings, ApiKeyEntry, protect_http_app  # noqa: E402
from mcp_fhir.agent_auth.api_keys import generate_api_key  # noqa: E402
from mcp_fhir.agent_auth.verifier import auth_settings_for, build_token_verifier  # noqa: E402
from tests.testbed.issuer import ServerThread, TestIssuer, bind_loopback  # noqa: E402

SCOPE = "mcp.read"
API_KEY, API_KEY_HASH = generate_api_key()
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
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)="([^"]*)"')


@dataclass
class Served:
    issuer: TestIssuer
    mcp_url: str
    metadata_url: str
    rejections: list[tuple[str, str | None]]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    sock = bind_loopback()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    rejections: list[tuple[str, str | None]] = []

    async def on_reject(reason: str, subject_id: str | None) -> None:
        rejections.append((reason, subject_id))

    with TestIssuer(default_audience=f"{base}/mcp") as issuer:
        settings = AgentAuthSettings(
            issuer=issuer.issuer,
            audience=f"{base}/mcp",
            required_scopes=(SCOPE,),
            api_keys=(ApiKeyEntry(id="bot", hash=API_KEY_HASH, scopes=(SCOPE,)),),
        )
        verifier = build_token_verifier(settings, httpx2.AsyncClient(), on_reject)
        server = MCPServer("challenge-probe", token_verifier=verifier, auth=auth_settings_for(settings))
        app = protect_http_app(server.streamable_http_app(), on_reject)
        with ServerThread(app, sock=sock):
            yield Served(
                issuer,
                f"{base}/mcp",
                f"{base}/.well-known/oauth-protected-resource/mcp",
                rejections,
            )


async def _post(served: Served, authorization: str | None) -> httpx2.Response:
    headers = dict(HEADERS)
    if authorization is not None:
        headers["Authorization"] = authorization
    async with httpx2.AsyncClient(timeout=10) as client:
        return await client.post(served.mcp_url, json=INITIALIZE, headers=headers)


def _challenge(response: httpx2.Response) -> tuple[str, dict[str, str]]:
    value = response.headers["www-authenticate"]
    scheme = value.split(" ", 1)[0]
    return scheme, dict(PARAM.findall(value))


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "token_missing"),
        ("Basic dXNlcjpwYXNz", "token_malformed"),
        ("Digest username=x", "token_malformed"),
    ],
    ids=["no-authorization-header", "basic-scheme", "digest-scheme"],
)
async def test_a_request_without_credentials_gets_a_bare_bearer_challenge_with_no_error(
    served, authorization, reason
):
    before = len(served.rejections)
    response = await _post(served, authorization)
    assert response.status_code == 401
    scheme, params = _challenge(response)
    assert scheme == "Bearer"
    assert params == {"resource_metadata": served.metadata_url}
    body = response.json()
    assert "error" not in body and "error_description" not in body
    assert int(response.headers["content-length"]) == len(response.content)
    assert served.rejections[before:] == [(reason, None)]


@pytest.mark.parametrize("kind", ["expired-jwt", "forged-jwt", "unknown-api-key", "garbage"])
async def test_a_bearer_credential_that_fails_still_gets_invalid_token(served, kind):
    token = {
        "expired-jwt": served.issuer.forge_expired(scopes=[SCOPE]),
        "forged-jwt": served.issuer.forge_foreign_key(scopes=[SCOPE]),
        "unknown-api-key": "mfk_" + "A" * 43,
        "garbage": "not-a-token",
    }[kind]
    response = await _post(served, f"Bearer {token}")
    assert response.status_code == 401
    scheme, params = _challenge(response)
    assert scheme == "Bearer"
    assert params["error"] == "invalid_token"
    assert params["resource_metadata"] == served.metadata_url
    assert response.json()["error"] == "invalid_token"


async def test_a_valid_credential_passes_and_a_short_scope_still_gets_insufficient_scope(served):
    ok = await _post(served, f"Bearer {API_KEY}")
    assert ok.status_code == 200
    narrow = served.issuer.mint("agent-narrow", scopes=["other.scope"])
    response = await _post(served, f"Bearer {narrow}")
    assert response.status_code == 403
    assert _challenge(response)[1]["error"] == "insufficient_scope"
