"""API keys: generation, digest-only config, constant-time lookup over every key, expiry."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mcp_fhir.agent_auth.api_keys as api_keys_module
from mcp_fhir.agent_auth.api_keys import API_KEY_PREFIX, ApiKeyStore, generate_api_key, hash_api_key
from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.settings import ApiKeyEntry

KEYS = [generate_api_key() for _ in range(5)]
CLAIMS = {"roles": ["nurse"], "patient": "pat-au-001", "purpose_of_use": "treatment"}


def _store(today: dt.date = dt.date(2026, 1, 1)) -> ApiKeyStore:
    entries = [
        ApiKeyEntry(id=f"bot-{i}", hash=digest, claims=CLAIMS, scopes=("mcp.read",), on_behalf_of="dr-a")
        for i, (_, digest) in enumerate(KEYS)
    ]
    entries.append(ApiKeyEntry(id="old-bot", hash=hash_api_key("mfk_old"), expires=dt.date(2025, 12, 31)))
    return ApiKeyStore(entries, today=lambda: today)


def _reason(store: ApiKeyStore, key: str) -> str:
    with pytest.raises(AgentAuthError) as info:
        store.verify(key)
    return info.value.reason


def test_generated_keys_are_prefixed_high_entropy_and_hashed_in_full():
    key, digest = generate_api_key()
    assert key.startswith(API_KEY_PREFIX) and len(key) == len(API_KEY_PREFIX) + 43
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert generate_api_key()[0] != key


def test_a_configured_key_yields_its_subject():
    subject = _store().verify(KEYS[3][0])
    assert (subject.id, subject.authn, subject.scopes, subject.on_behalf_of) == (
        "bot-3",
        "api_key",
        ("mcp.read",),
        "dr-a",
    )
    assert subject.claims == CLAIMS


def test_subject_claims_are_a_copy_so_callers_cannot_change_the_config():
    store = _store()
    store.verify(KEYS[0][0]).claims["roles"].append("admin")
    assert store.verify(KEYS[0][0]).claims == CLAIMS


@pytest.mark.parametrize(
    "key", ["mfk_unknown", "not-a-key", KEYS[0][0] + "x", KEYS[0][0][:-1], "mfk_" + "a" * 300]
)
def test_unknown_keys_are_rejected(key):
    assert _reason(_store(), key) == "api_key_unknown"


def test_an_expired_key_is_rejected_after_its_last_day_and_names_its_id():
    assert _store(today=dt.date(2025, 12, 31)).verify("mfk_old").id == "old-bot"
    with pytest.raises(AgentAuthError) as info:
        _store(today=dt.date(2026, 1, 1)).verify("mfk_old")
    assert (info.value.reason, info.value.subject_id) == ("token_expired", "old-bot")


@pytest.mark.parametrize("position", [0, 2, 4])
def test_lookup_compares_against_every_configured_digest_wherever_the_match_is(monkeypatch, position):
    calls = []
    real = api_keys_module.hmac.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(api_keys_module.hmac, "compare_digest", counting)
    store = _store()
    assert store.verify(KEYS[position][0]).id == f"bot-{position}"
    assert len(calls) == len(store)
    calls.clear()
    _reason(store, "mfk_nobody")
    assert len(calls) == len(store)


def test_expiry_is_reported_as_the_end_of_the_last_day_utc():
    expected = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp())
    assert _store().expires_at("old-bot") == expected
    assert _store().expires_at("bot-0") is None


@given(st.text(max_size=80))
def test_no_arbitrary_string_is_accepted(candidate):
    store = _store()
    if candidate in {k for k, _ in KEYS}:
        return
    with pytest.raises(AgentAuthError):
        store.verify(candidate)
