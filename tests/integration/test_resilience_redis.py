"""The Redis-backed cache and rate limiter shared by two "replicas" (two independent instances).

Needs ``MCP_FHIR_TEST_REDIS_URL`` (``eval "$(scripts/services.sh start)"``): skipped without it
locally, failed without it when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest

from mcp_fhir._exceptions import ConfigError, UpstreamUnavailable
from mcp_fhir.resilience.cache import Cache, CacheKey, CacheSettings, RedisStore
from mcp_fhir.resilience.ratelimit import RateLimit, RateLimiter, RateLimiterSettings, RedisBucketStore
from mcp_fhir.resilience.stores import redis_from_env

pytestmark = [pytest.mark.integration, pytest.mark.redis]

REDIS_ENV = "MCP_FHIR_TEST_REDIS_URL"


@pytest.fixture
def redis_env() -> dict[str, str]:
    url = os.environ.get(REDIS_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{REDIS_ENV} is not set but CI is: start the services with scripts/services.sh")
        pytest.skip(f'{REDIS_ENV} is not set (eval "$(scripts/services.sh start)")')
    return {REDIS_ENV: url}


@pytest.fixture
def prefix() -> str:
    return f"mcpfhir-test:{uuid.uuid4().hex}:"


def _replica_cache(redis_env: dict[str, str], prefix: str) -> Cache:
    settings = CacheSettings(backend="redis", redis_url_env=REDIS_ENV, redis_key_prefix=prefix)
    return Cache.from_settings(settings, environ=redis_env)


async def test_two_cache_replicas_share_entries_and_invalidation(redis_env, prefix):
    a, b = _replica_cache(redis_env, prefix), _replica_cache(redis_env, prefix)
    try:
        obs = CacheKey.build("epic", "p1", "Observation", {"category": "laboratory"})
        meds = CacheKey.build("epic", "p1", "MedicationStatement")
        other = CacheKey.build("epic", "p2", "Observation", {"category": "laboratory"})
        await a.put(obs, {"resourceType": "Bundle", "total": 3})
        await a.put(meds, {"resourceType": "Bundle", "total": 1})
        await a.put(other, {"resourceType": "Bundle", "total": 9})

        shared = await b.lookup(obs)
        assert shared.outcome == "hit" and shared.entry is not None
        assert shared.entry.value == {"resourceType": "Bundle", "total": 3}

        assert await b.invalidate_patient("epic", "p1", ["Observation"]) == 1
        assert await a.get(obs) is None
        assert await a.get(meds) is not None
        assert await a.get(other) is not None

        assert await a.invalidate_patient("epic", "p1") == 1
        assert await b.get(meds) is None
        assert await b.get(other) is not None
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_keys_hold_no_phi_and_expire_after_ttl_plus_stale_retention(redis_env, prefix):
    cache = _replica_cache(redis_env, prefix)
    raw = redis_from_env(REDIS_ENV, "test", environ=redis_env)
    try:
        key = CacheKey.build("epic", "patient-SECRET", "Patient", {"identifier": "ihi|SECRET"})
        await cache.put(key, {"resourceType": "Patient"})
        names = [k.decode() async for k in raw.scan_iter(match=prefix + "*")]
        assert len(names) == 2  # the entry and the patient's index
        assert not any("SECRET" in n for n in names)
        pttl = await raw.pttl(f"{prefix}e:{key.digest}")
        expected_ms = (cache.settings.ttl_for("Patient") + cache.settings.stale_retention_seconds) * 1000
        assert expected_ms - 5_000 < pttl <= expected_ms
        assert await raw.pttl(f"{prefix}i:{key.scope}") > 0
    finally:
        await cache.aclose()
        await raw.aclose()


async def test_a_stale_entry_is_still_served_from_redis(redis_env, prefix):
    now = [1_000_000.0]
    settings = CacheSettings(backend="redis", redis_url_env=REDIS_ENV, redis_key_prefix=prefix)
    cache = Cache.from_settings(settings, environ=redis_env, clock=lambda: now[0])
    try:
        key = CacheKey.build("epic", "p1", "Observation")
        await cache.put(key, {"v": 1})
        now[0] += settings.ttl_for("Observation") + 1
        assert (await cache.lookup(key)).outcome == "stale"
    finally:
        await cache.aclose()


async def test_two_limiter_replicas_share_one_global_limit(redis_env, prefix):
    limit = RateLimit(requests_per_minute=600, burst=6)  # 10/s, our bucket 5
    replicas = [
        RateLimiter(
            {"oracle": limit},
            RedisBucketStore(redis_from_env(REDIS_ENV, "t", environ=redis_env), prefix=prefix),
        )
        for _ in range(2)
    ]
    releases: list[float] = []

    async def call(limiter: RateLimiter) -> None:
        await limiter.acquire("oracle", max_wait=5.0)
        releases.append(time.monotonic())

    try:
        await asyncio.gather(*(call(replicas[i % 2]) for i in range(30)))
    finally:
        for limiter in replicas:
            await limiter.aclose()
    releases.sort()
    start = releases[0]
    # every prefix of the releases fits one bucket: capacity + rate * elapsed (+1 for timer slop)
    for count, t in enumerate(releases, start=1):
        assert count <= limit.capacity + 10 * (t - start) + 1
    # separate buckets would have finished in ~1 s; one shared bucket needs (30 - 5) / 10 s
    assert releases[-1] - start >= 2.3


async def test_a_429_seen_by_one_replica_holds_back_the_other(redis_env, prefix):
    limit = RateLimit(requests_per_minute=600, burst=6)
    a, b = (
        RateLimiter(
            {"oracle": limit},
            RedisBucketStore(redis_from_env(REDIS_ENV, "t", environ=redis_env), prefix=prefix),
        )
        for _ in range(2)
    )
    try:
        await a.penalise("oracle", 1.0)
        assert await b.acquire("oracle", max_wait=5.0) >= 0.9
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_unreachable_redis_fails_the_rate_limiter_closed():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"DEAD_REDIS": f"redis://127.0.0.1:{port}/0"}
    settings = RateLimiterSettings(
        limits={"oracle": {"requests_per_minute": 100}}, store="redis", redis_url_env="DEAD_REDIS"
    )
    limiter = RateLimiter.from_settings(settings, environ=env)
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await limiter.acquire("oracle")
        assert info.value.code == "upstream_unavailable"
        assert str(port) not in str(info.value)
    finally:
        await limiter.aclose()


async def test_an_unreachable_redis_cache_degrades_to_a_miss_but_invalidation_raises():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = Cache(
        CacheSettings(), RedisStore(redis_from_env("R", "t", environ={"R": f"redis://127.0.0.1:{port}"}))
    )
    try:
        key = CacheKey.build("epic", "p1", "Patient")
        await cache.put(key, {"v": 1})
        assert (await cache.lookup(key)).outcome == "miss"
        with pytest.raises(UpstreamUnavailable):
            await cache.invalidate_patient("epic", "p1")
    finally:
        await cache.aclose()


def test_a_redis_store_without_its_url_variable_is_a_config_error():
    settings = RateLimiterSettings(store="redis", redis_url_env="MCP_FHIR_TEST_NOT_SET")
    with pytest.raises(ConfigError) as info:
        RateLimiter.from_settings(settings, environ={})
    assert info.value.key == "rate_limit.redis_url_env"


async def test_a_hold_on_a_backend_without_a_rate_limit_is_shared_by_two_limiter_replicas(redis_env, prefix):
    a, b = (
        RateLimiter({}, RedisBucketStore(redis_from_env(REDIS_ENV, "t", environ=redis_env), prefix=prefix))
        for _ in range(2)
    )
    try:
        assert await b.acquire("generic", max_wait=0.0) < 0.5  # no limit: free until held (one round trip)
        await a.penalise("generic", 1.0)
        assert 0.5 < await b.held_for("generic") <= 1.0
        assert await b.acquire("generic", max_wait=5.0) >= 0.9
        assert await a.acquire("generic", max_wait=0.0) < 0.5  # free again once it has passed
    finally:
        await a.aclose()
        await b.aclose()
