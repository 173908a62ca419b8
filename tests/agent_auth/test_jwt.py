"""JwtVerifier: header, key, signature and claims checks, each with its reason."""

from __future__ import annotations

import base64
import json
import time

import jwt as pyjwt
import pytest

from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.jwt import JwtVerifier, decode_header
from mcp_fhir.agent_auth.settings import AgentAuthSettings
from tests.agent_auth.conftest import AUDIENCE, StaticKeys
from tests.testbed.issuer import TestIssuer


def _verifier(issuer: TestIssuer, keys: StaticKeys, clock=time.time, **overrides) -> JwtVerifier:
    settings = AgentAuthSettings(issuer=issuer.issuer, audience=AUDIENCE, **overrides)
    return JwtVerifier(settings, keys, clock=clock)


async def _reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(AgentAuthError) as info:
        await verifier.verify(token)
    assert info.value.code == "unauthenticated"
    return info.value.reason


async def test_valid_rs256_token_yields_subject_with_raw_claims_untouched(issuer, static_keys):
    extra = {
        "roles": ["nurse"],
        "patient": "pat-au-001",
        "purpose_of_use": "treatment",
        "nested": {"a": [1, 2]},
    }
    token = issuer.mint("agent-7", scopes=["mcp.read", "patient/*.rs"], claims=extra)

    subject = await _verifier(issuer, static_keys).verify(token)

    assert subject.id == "agent-7"
    assert subject.authn == "oauth"
    assert subject.scopes == ("mcp.read", "patient/*.rs")
    assert subject.claims == pyjwt.decode(token, options={"verify_signature": False})
    assert subject.on_behalf_of is None


@pytest.mark.parametrize("alg", ["ES256", "RS384", "PS256"])
async def test_each_default_algorithm_family_verifies(issuer, static_keys, alg):
    token = issuer.mint("agent-1", kid=issuer.kid_for(alg))
    assert (await _verifier(issuer, static_keys).verify(token)).id == "agent-1"


async def test_scp_list_is_read_when_scope_is_absent(issuer, static_keys):
    token = issuer.mint(claims={"scp": ["a.read", "b.write"]})
    assert (await _verifier(issuer, static_keys).verify(token)).scopes == ("a.read", "b.write")


async def test_a_delegation_token_makes_the_actor_the_subject_acting_for_sub(issuer, static_keys):
    # RFC 8693 4.1: `sub` is the principal (the practitioner), `act.sub` the actor (the agent).
    token = issuer.mint("dr-jones", claims={"act": {"sub": "agent-1"}})
    subject = await _verifier(issuer, static_keys).verify(token)
    assert (subject.id, subject.on_behalf_of) == ("agent-1", "dr-jones")


async def test_without_delegation_the_configured_claim_names_on_behalf_of(issuer, static_keys):
    token = issuer.mint("agent-1", claims={"practitioner": "dr-who"})
    verifier = _verifier(issuer, static_keys, on_behalf_of_claim="practitioner")
    subject = await verifier.verify(token)
    assert (subject.id, subject.on_behalf_of) == ("agent-1", "dr-who")


async def test_a_delegation_token_wins_over_the_configured_claim(issuer, static_keys):
    token = issuer.mint("dr-jones", claims={"act": {"sub": "agent-1"}, "practitioner": "dr-who"})
    verifier = _verifier(issuer, static_keys, on_behalf_of_claim="practitioner")
    subject = await verifier.verify(token)
    assert (subject.id, subject.on_behalf_of) == ("agent-1", "dr-jones")


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        ("forge_alg_none", "alg_not_allowed"),
        ("forge_hs256_with_public_key", "alg_not_allowed"),
        ("forge_unknown_kid", "unknown_kid"),
        ("forge_foreign_key", "bad_signature"),
        ("forge_wrong_issuer", "wrong_issuer"),
        ("forge_wrong_audience", "wrong_audience"),
        ("forge_expired", "token_expired"),
        ("forge_not_yet_valid", "token_not_yet_valid"),
    ],
)
async def test_forged_tokens_are_rejected_with_their_reason(issuer, static_keys, forge, reason):
    token = getattr(issuer, forge)()
    assert await _reason(_verifier(issuer, static_keys), token) == reason


async def test_hs256_is_refused_even_if_its_key_were_found(issuer, static_keys):
    token = issuer.forge_hs256_with_public_key()
    await _reason(_verifier(issuer, static_keys), token)
    assert static_keys.lookups == 0  # rejected on the header, before any key is fetched


async def test_algorithm_outside_the_configured_allow_list_is_rejected(issuer, static_keys):
    token = issuer.mint(kid=issuer.kid_for("RS384"))
    verifier = _verifier(issuer, static_keys, allowed_algorithms=("RS256",))
    assert await _reason(verifier, token) == "alg_not_allowed"


async def test_header_alg_that_does_not_match_the_key_type_is_rejected(issuer, static_keys):
    rsa_token = issuer.mint(kid=issuer.kid_for("RS256"), headers={"kid": issuer.kid_for("ES256")})
    assert await _reason(_verifier(issuer, static_keys), rsa_token) == "alg_not_allowed"


async def test_missing_kid_is_rejected(issuer, static_keys):
    token = issuer.mint(headers={"kid": None})
    assert await _reason(_verifier(issuer, static_keys), token) == "unknown_kid"


async def test_critical_header_extensions_are_rejected(issuer, static_keys):
    token = issuer.mint(headers={"crit": ["exp"], "exp": 1})
    assert await _reason(_verifier(issuer, static_keys), token) == "token_malformed"


async def test_tampered_payload_fails_the_signature(issuer, static_keys):
    header, payload, signature = issuer.mint("agent-1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert await _reason(_verifier(issuer, static_keys), f"{header}.{forged}.{signature}") == "bad_signature"


async def test_audience_list_containing_this_server_is_accepted(issuer, static_keys):
    token = issuer.mint(aud=["https://other.example/api", AUDIENCE])
    assert (await _verifier(issuer, static_keys).verify(token)).id == "agent-1"


async def test_audience_is_compared_exactly_so_a_trailing_slash_differs(issuer, static_keys):
    token = issuer.mint(aud=AUDIENCE + "/")
    assert await _reason(_verifier(issuer, static_keys), token) == "wrong_audience"


async def test_token_without_exp_is_malformed(issuer, static_keys):
    token = issuer.mint(exp_in=None)
    assert await _reason(_verifier(issuer, static_keys), token) == "token_malformed"


async def test_non_finite_exp_is_malformed(issuer, static_keys):
    token = issuer.mint(claims={"exp": float("inf")})
    assert await _reason(_verifier(issuer, static_keys), token) == "token_malformed"


async def test_token_without_sub_is_malformed(issuer, static_keys):
    token = issuer.mint(claims={"sub": ""})
    assert await _reason(_verifier(issuer, static_keys), token) == "token_malformed"


async def test_expiry_within_the_leeway_is_still_accepted_and_beyond_it_is_not(issuer, static_keys):
    now = 1_800_000_000.0
    token = issuer.mint(now=now, exp_in=60)
    clock = {"t": now + 60 + 29}
    verifier = _verifier(issuer, static_keys, clock=lambda: clock["t"], leeway_seconds=30)
    assert (await verifier.verify(token)).id == "agent-1"
    clock["t"] = now + 60 + 30
    assert await _reason(verifier, token) == "token_expired"


async def test_not_before_is_honoured_with_the_leeway(issuer, static_keys):
    now = 1_800_000_000.0
    token = issuer.mint(now=now, nbf_in=100, exp_in=1000)
    clock = {"t": now + 69}
    verifier = _verifier(issuer, static_keys, clock=lambda: clock["t"], leeway_seconds=30)
    assert await _reason(verifier, token) == "token_not_yet_valid"
    clock["t"] = now + 70
    assert (await verifier.verify(token)).id == "agent-1"


async def test_issued_at_in_the_future_is_rejected(issuer, static_keys):
    token = issuer.mint(iat_in=3600, exp_in=7200)
    assert await _reason(_verifier(issuer, static_keys), token) == "token_not_yet_valid"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b", "a.b.c.d", "!!!.###.$$$", "x" * 20000])
def test_garbage_is_malformed_before_anything_is_trusted(garbage):
    with pytest.raises(AgentAuthError) as info:
        decode_header(garbage)
    assert info.value.reason == "token_malformed"


def test_error_repr_and_message_never_hold_the_token(issuer):
    token = issuer.forge_expired()
    error = AgentAuthError("token_expired", subject_id="agent-1")
    assert token not in repr(error) and token not in str(error)
    assert error.to_dict()["reason"] == "token_expired"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": None}, "wrong_audience"),
        ({"aud": [AUDIENCE + "/", "https://other.example.org"]}, "wrong_audience"),
        ({"aud": 42}, "wrong_audience"),
        ({"nbf": "soon"}, "token_malformed"),
        ({"iat": True}, "token_malformed"),
        ({"exp": "later"}, "token_malformed"),
        ({"sub": None}, "token_malformed"),
        ({"sub": 12}, "token_malformed"),
    ],
    ids=lambda v: str(v),
)
async def test_each_registered_claim_defect_maps_to_its_reason(issuer, static_keys, claims, reason):
    token = issuer.mint(claims=claims)
    assert await _reason(_verifier(issuer, static_keys), token) == reason


async def test_with_zero_leeway_a_token_expires_at_exactly_its_exp(issuer, static_keys):
    now = 1_800_000_000.0
    token = issuer.mint(now=now, exp_in=60)
    clock = {"t": now + 59.999}
    verifier = _verifier(issuer, static_keys, clock=lambda: clock["t"], leeway_seconds=0)
    assert (await verifier.verify(token)).id == "agent-1"
    clock["t"] = now + 60
    assert await _reason(verifier, token) == "token_expired"
