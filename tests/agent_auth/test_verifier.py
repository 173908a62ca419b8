"""AgentTokenVerifier: JWT or API key → AccessToken, rejections → on_reject, nothing secret in logs."""

from __future__ import annotations

import logging

import pytest

from mcp_fhir.agent_auth.api_keys import ApiKeyStore, generate_api_key
from mcp_fhir.agent_auth.errors import AgentAuthError, token_fingerprint
from mcp_fhir.agent_auth.jwt import JwtVerifier
from mcp_fhir.agent_auth.settings import AgentAuthSettings, ApiKeyEntry
from mcp_fhir.agent_auth.verifier import (
    API_KEY_ISSUER,
    AgentTokenVerifier,
    build_token_verifier,
    subject_from_access_token,
)
from tests.agent_auth.conftest import AUDIENCE

API_KEY, API_KEY_HASH = generate_api_key()
KEY_CLAIMS = {"roles": ["nurse"], "patient": "pat-au-001", "purpose_of_use": "treatment"}


class Rejections:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def __call__(self, reason: str, subject_id: str | None) -> None:
        self.seen.append((reason, subject_id))


@pytest.fixture
def rejections() -> Rejections:
    return Rejections()


@pytest.fixture
def verifier(issuer, static_keys, rejections) -> AgentTokenVerifier:
    settings = AgentAuthSettings(issuer=issuer.issuer, audience=AUDIENCE)
    keys = ApiKeyStore(
        [ApiKeyEntry(id="ward-bot", hash=API_KEY_HASH, claims=KEY_CLAIMS, scopes=("mcp.read",))]
    )
    return AgentTokenVerifier(JwtVerifier(settings, static_keys), keys, rejections)


async def test_a_valid_jwt_becomes_an_access_token_that_rebuilds_the_exact_subject(issuer, verifier):
    token = issuer.mint("dr-a", scopes=["mcp.read"], claims={"azp": "client-9", "act": {"sub": "agent-1"}})
    access = await verifier.verify_token(token)
    assert access is not None
    assert (access.client_id, access.subject, access.resource, access.scopes) == (
        "client-9",
        "agent-1",
        AUDIENCE,
        ["mcp.read"],
    )
    assert access.claims["iss"] == issuer.issuer
    assert isinstance(access.expires_at, int)
    assert subject_from_access_token(access) == await verifier.authenticate(token)
    assert subject_from_access_token(access).on_behalf_of == "dr-a"


async def test_a_valid_api_key_becomes_an_access_token_with_authn_api_key(verifier):
    access = await verifier.verify_token(API_KEY)
    assert access is not None
    assert (access.client_id, access.subject, access.resource) == ("ward-bot", "ward-bot", AUDIENCE)
    assert access.claims["iss"] == API_KEY_ISSUER
    subject = subject_from_access_token(access)
    assert (subject.authn, subject.claims, subject.scopes) == ("api_key", KEY_CLAIMS, ("mcp.read",))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda i: i.forge_alg_none(), ("alg_not_allowed", None)),
        (lambda i: i.forge_hs256_with_public_key(), ("alg_not_allowed", None)),
        (lambda i: i.forge_unknown_kid(), ("unknown_kid", None)),
        (lambda i: i.forge_foreign_key("mallory"), ("bad_signature", None)),
        (lambda i: i.forge_wrong_audience("agent-2"), ("wrong_audience", "agent-2")),
        (lambda i: i.forge_expired("agent-3"), ("token_expired", "agent-3")),
        (lambda i: "mfk_not-a-real-key", ("api_key_unknown", None)),
        (lambda i: "", ("token_missing", None)),
        (lambda i: "garbage", ("token_malformed", None)),
    ],
)
async def test_rejections_return_none_and_reach_on_reject(issuer, verifier, rejections, make, expected):
    assert await verifier.verify_token(make(issuer)) is None
    assert rejections.seen == [expected]


async def test_api_keys_are_refused_when_none_are_configured(issuer, static_keys, rejections):
    settings = AgentAuthSettings(issuer=issuer.issuer, audience=AUDIENCE)
    verifier = AgentTokenVerifier(JwtVerifier(settings, static_keys), None, rejections)
    assert await verifier.verify_token(API_KEY) is None
    assert rejections.seen == [("api_key_unknown", None)]


def test_an_access_token_without_our_subject_block_is_refused():
    from mcp.server.auth.provider import AccessToken

    with pytest.raises(AgentAuthError) as info:
        subject_from_access_token(AccessToken(token="t", client_id="c", scopes=[], claims={"iss": "x"}))
    assert info.value.reason == "token_malformed"


async def test_no_token_or_key_ever_reaches_a_log_record(issuer, verifier, caplog):
    credentials = [
        issuer.mint("agent-1"),
        issuer.forge_expired(),
        issuer.forge_hs256_with_public_key(),
        issuer.forge_unknown_kid(),
        API_KEY,
        "mfk_wrong-key-value",
        "some.garbage.token",
    ]
    with caplog.at_level(logging.DEBUG):
        for credential in credentials:
            await verifier.verify_token(credential)
    assert caplog.records, "rejections must be logged (by reason)"
    logged = "\n".join(r.getMessage() + repr(r.args) + repr(r.__dict__) for r in caplog.records)
    for credential in credentials:
        assert credential not in logged
        for part in credential.split("."):
            if len(part) > 8:
                assert part not in logged
    assert token_fingerprint(credentials[1]) in logged  # rejections are traceable by fingerprint only
    assert "reason=unknown_kid" in logged


def test_build_token_verifier_needs_some_way_to_authenticate():
    import httpx2

    from mcp_fhir._exceptions import ConfigError

    with pytest.raises(ConfigError) as info:
        build_token_verifier(AgentAuthSettings(), httpx2.AsyncClient())
    assert info.value.key == "auth"
