"""JwksCache: TTL, refetch on unknown kid with a floor, single flight, discovery, fail closed."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx2
import pytest

from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.jwks import JwksCache, discovery_urls
from mcp_fhir.agent_auth.settings import JwksSettings
from tests.testbed.issuer import TestIssuer

ISSUER = "https://login.example.org"
JWKS_URL = "https://login.example.org/jwks"
SETTINGS = JwksSettings(ttl_seconds=300, min_refresh_seconds=30)


class FakeIssuer:
    """A MockTransport handler serving a mutable JWKS and metadata, counting requests."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.jwks_hits = 0
        self.paths: list[str] = []
        self.metadata: dict[str, dict[str, Any]] = {}
        self.status = 200
        self.gate: asyncio.Event | None = None
        self.body: bytes | None = None

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.paths.append(request.url.path)
        if request.url.path in self.metadata:
            return httpx2.Response(200, json=self.metadata[request.url.path])
        if request.url.path != "/jwks":
            return httpx2.Response(404)
        self.jwks_hits += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.body is not None:
            return httpx2.Response(self.status, content=self.body)
        return httpx2.Response(self.status, json={"keys": self.keys})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _jwk(kid: str, kty: str = "RSA", **extra: Any) -> dict[str, Any]:
    return {"kid": kid, "kty": kty, "n": "AQAB", "e": "AQAB", **extra}


def _cache(fake: FakeIssuer, clock: Clock, **kwargs: Any) -> JwksCache:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(fake))
    kwargs.setdefault("jwks_url", JWKS_URL)
    kwargs.setdefault("settings", SETTINGS)
    return JwksCache(client, clock=clock, **kwargs)


async def _reason(cache: JwksCache, kid: str) -> str:
    with pytest.raises(AgentAuthError) as info:
        await cache.get_key(kid)
    return info.value.reason


async def test_key_set_is_fetched_once_and_cached_within_the_ttl():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    cache = _cache(fake, clock)
    for _ in range(5):
        assert (await cache.get_key("k1"))["kid"] == "k1"
    clock.now += 299
    await cache.get_key("k1")
    assert fake.jwks_hits == 1


async def test_key_set_is_refetched_after_the_ttl():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    cache = _cache(fake, clock)
    await cache.get_key("k1")
    clock.now += 300
    await cache.get_key("k1")
    assert fake.jwks_hits == 2


async def test_unknown_kid_triggers_a_refetch_that_picks_up_a_rotated_key():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    cache = _cache(fake, clock)
    await cache.get_key("k1")
    fake.keys.append(_jwk("k2"))
    clock.now += 31
    assert (await cache.get_key("k2"))["kid"] == "k2"
    assert fake.jwks_hits == 2


async def test_unknown_kid_refetches_are_rate_limited():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    cache = _cache(fake, clock)
    await cache.get_key("k1")
    for i in range(50):  # a kid-spraying burst within the floor costs the issuer nothing
        clock.now += 0.5
        assert await _reason(cache, f"sprayed-{i}") == "unknown_kid"
    assert fake.jwks_hits == 1
    clock.now += 30
    assert await _reason(cache, "sprayed-again") == "unknown_kid"
    assert fake.jwks_hits == 2


async def test_concurrent_lookups_share_a_single_refresh():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    fake.gate = asyncio.Event()
    cache = _cache(fake, clock)
    tasks = [asyncio.create_task(cache.get_key("k1")) for _ in range(20)]
    deadline = asyncio.get_running_loop().time() + 5
    while fake.jwks_hits == 0:  # wait for the one fetch to be in flight
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("no fetch started")
        await asyncio.sleep(0)
    fake.gate.set()
    results = await asyncio.gather(*tasks)
    assert {r["kid"] for r in results} == {"k1"}
    assert fake.jwks_hits == 1


async def test_transport_failure_is_jwks_unavailable_and_is_not_retried_within_the_floor():
    clock = Clock()
    calls = []

    def refuse(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        raise httpx2.ConnectError("refused", request=request)

    cache = JwksCache(
        httpx2.AsyncClient(transport=httpx2.MockTransport(refuse)), jwks_url=JWKS_URL, clock=clock
    )
    assert await _reason(cache, "k1") == "jwks_unavailable"
    assert await _reason(cache, "k1") == "jwks_unavailable"
    assert len(calls) == 1
    clock.now += 30
    assert await _reason(cache, "k1") == "jwks_unavailable"
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b"{}"), (200, b"not json"), (200, b"[1, 2]"), (200, b'{"keys": "nope"}'), (200, b" " * 300_000)],
)
async def test_bad_key_set_responses_are_jwks_unavailable(status, body):
    fake, clock = FakeIssuer([]), Clock()
    fake.status, fake.body = status, body
    assert await _reason(_cache(fake, clock), "k1") == "jwks_unavailable"


async def test_an_expired_key_set_is_never_served_when_the_refresh_fails():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    cache = _cache(fake, clock)
    await cache.get_key("k1")
    fake.status, fake.body = 503, b"{}"
    clock.now += 301
    assert await _reason(cache, "k1") == "jwks_unavailable"


async def test_symmetric_private_and_encryption_keys_are_dropped():
    keys = [
        {"kid": "oct", "kty": "oct", "k": "c2VjcmV0"},
        _jwk("private", d="AQAB"),
        _jwk("enc", use="enc"),
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        _jwk("ok"),
    ]
    fake, clock = FakeIssuer(keys), Clock()
    cache = _cache(fake, clock)
    assert (await cache.get_key("ok"))["kid"] == "ok"
    for kid in ("oct", "private", "enc"):
        assert await _reason(cache, kid) == "unknown_kid"


async def test_jwks_url_is_discovered_from_rfc8414_metadata():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    fake.metadata["/.well-known/oauth-authorization-server"] = {"issuer": ISSUER, "jwks_uri": JWKS_URL}
    cache = _cache(fake, clock, jwks_url=None, issuer=ISSUER)
    assert (await cache.get_key("k1"))["kid"] == "k1"


async def test_discovery_falls_back_to_openid_configuration():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    fake.metadata["/.well-known/openid-configuration"] = {"issuer": ISSUER, "jwks_uri": JWKS_URL}
    cache = _cache(fake, clock, jwks_url=None, issuer=ISSUER)
    assert (await cache.get_key("k1"))["kid"] == "k1"
    assert fake.paths[0] == "/.well-known/oauth-authorization-server"


async def test_discovery_refuses_metadata_for_another_issuer():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    fake.metadata["/.well-known/oauth-authorization-server"] = {
        "issuer": "https://evil",
        "jwks_uri": JWKS_URL,
    }
    cache = _cache(fake, clock, jwks_url=None, issuer=ISSUER)
    assert await _reason(cache, "k1") == "jwks_unavailable"
    assert fake.jwks_hits == 0


def test_discovery_urls_insert_the_well_known_segment_before_an_issuer_path():
    assert discovery_urls("https://as.example/tenant1") == (
        "https://as.example/.well-known/oauth-authorization-server/tenant1",
        "https://as.example/tenant1/.well-known/openid-configuration",
    )


async def test_rotation_against_a_real_issuer_is_picked_up_on_the_new_kid():
    with TestIssuer(default_audience="http://127.0.0.1:1/mcp") as issuer:
        clock = Clock()
        async with httpx2.AsyncClient() as client:
            cache = JwksCache(client, issuer=issuer.issuer, clock=clock, settings=SETTINGS)
            await cache.get_key(issuer.signing_kid)
            new_kid = issuer.rotate("ES256")
            assert await _reason(cache, new_kid) == "unknown_kid"  # within the floor: not refetched
            clock.now += 30
            assert (await cache.get_key(new_kid))["kid"] == new_kid
            assert issuer.jwks_requests == 2
            assert issuer.metadata_requests == 1


async def test_a_fetch_that_never_finishes_is_cut_at_the_total_deadline_and_fails_closed():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    fake.gate = asyncio.Event()  # never set: the issuer accepts the request and never answers
    cache = _cache(fake, clock, settings=replace(SETTINGS, timeout_seconds=0.05))
    async with asyncio.timeout(5):  # the bound on this test, far above the deadline under test
        assert await _reason(cache, "k1") == "jwks_unavailable"
    assert fake.jwks_hits == 1
    assert await _reason(cache, "k1") == "jwks_unavailable"  # remembered: no second fetch in the floor
    assert fake.jwks_hits == 1


async def test_the_deadline_covers_discovery_and_fetch_together():
    fake, clock = FakeIssuer([_jwk("k1")]), Clock()
    fake.metadata["/.well-known/oauth-authorization-server"] = {"issuer": ISSUER, "jwks_uri": JWKS_URL}
    fake.gate = asyncio.Event()
    cache = _cache(
        fake, clock, jwks_url=None, issuer=ISSUER, settings=replace(SETTINGS, timeout_seconds=0.05)
    )
    async with asyncio.timeout(5):
        assert await _reason(cache, "k1") == "jwks_unavailable"


async def test_a_cached_key_costs_no_network_call_however_many_tokens_use_it():
    calls = {"n": 0}
    fake = FakeIssuer([_jwk("k1")])

    async def counting(request: httpx2.Request) -> httpx2.Response:
        calls["n"] += 1
        return await fake(request)

    clock = Clock()
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(counting))
    cache = JwksCache(client, jwks_url=JWKS_URL, clock=clock, settings=SETTINGS)
    for _ in range(1000):
        await cache.get_key("k1")
    assert calls["n"] == 1 and cache.fetches == 1
