from __future__ import annotations

import asyncio
import email.utils

import pytest

from mcp_fhir import metrics
from mcp_fhir._exceptions import ConfigError, UpstreamRateLimited
from mcp_fhir.resilience.ratelimit import (
    DEFAULT_RETRY_AFTER_SECONDS,
    MAX_RETRY_AFTER_SECONDS,
    MemoryBucketStore,
    RateLimit,
    RateLimiter,
    RateLimiterSettings,
    parse_retry_after,
)

ORACLE = RateLimit(requests_per_minute=100)  # burst 16, our bucket 15 (one token of headroom)


def _limiter(clock, **limits: RateLimit) -> RateLimiter:
    return RateLimiter(
        limits or {"oracle": ORACLE}, MemoryBucketStore(clock=clock), clock=clock, sleep=clock.sleep
    )


def _rejections(backend: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("mcp_fhir_rate_limit_rejections_total", {"backend": backend}) or 0.0
    )


def test_default_burst_is_a_sixth_of_the_limit_less_one_token_of_headroom():
    assert ORACLE.upstream_burst == 16
    assert ORACLE.capacity == 15
    assert ORACLE.interval == pytest.approx(0.6)
    assert RateLimit(requests_per_minute=3).capacity == 1


async def test_a_full_bucket_releases_its_burst_without_waiting_then_paces_at_the_limit(clock):
    limiter = _limiter(clock)
    waits = [await limiter.acquire("oracle") for _ in range(15)]
    assert waits == [0.0] * 15
    assert await limiter.acquire("oracle") == pytest.approx(0.6)
    assert await limiter.acquire("oracle") == pytest.approx(0.6)
    assert clock.sleeps == [pytest.approx(0.6), pytest.approx(0.6)]


async def test_no_sixty_second_window_sees_more_than_the_limit_plus_burst(clock):
    limiter = _limiter(clock)
    start = clock()
    releases = []
    for _ in range(300):
        await limiter.acquire("oracle", max_wait=10.0)
        releases.append(clock() - start)
    for i, t in enumerate(releases):
        in_window = sum(1 for u in releases[i:] if u < t + 60.0)
        assert in_window <= 100 + ORACLE.capacity


async def test_concurrent_callers_are_queued_in_arrival_order(clock):
    recorded: list[tuple[int, float]] = []

    async def no_wait(seconds: float) -> None:
        recorded.append((len(recorded), seconds))

    limiter = RateLimiter({"b": RateLimit(60, burst=2, headroom_tokens=0)}, MemoryBucketStore(clock=clock),
                          clock=clock, sleep=no_wait)  # fmt: skip
    await asyncio.gather(*(limiter.acquire("b", max_wait=100) for _ in range(6)))
    assert [s for _, s in recorded] == [pytest.approx(w) for w in (1.0, 2.0, 3.0, 4.0)]


async def test_a_wait_longer_than_max_wait_is_rejected_at_once_without_sleeping(clock):
    limiter = _limiter(clock, b=RateLimit(60, burst=1, headroom_tokens=0))
    before = _rejections("b")
    assert await limiter.acquire("b", max_wait=0) == 0.0
    with pytest.raises(UpstreamRateLimited) as info:
        await limiter.acquire("b", max_wait=0.5)
    assert info.value.code == "upstream_rate_limited"
    assert clock.sleeps == []
    assert _rejections("b") == before + 1
    # the rejected caller took no slot: the next caller still gets the first free one
    assert await limiter.acquire("b", max_wait=1.0) == pytest.approx(1.0)


async def test_after_a_429_the_next_request_waits_at_least_retry_after_and_the_bucket_restarts_empty(clock):
    limiter = _limiter(clock)
    await limiter.acquire("oracle")
    await limiter.penalise("oracle", parse_retry_after("3", now=0.0))
    assert await limiter.acquire("oracle") >= 3.0
    # after the penalty the burst is gone: the next one is paced at the limit again
    assert await limiter.acquire("oracle") == pytest.approx(0.6)


async def test_a_caller_already_waiting_when_a_429_arrives_waits_for_the_retry_after_too(clock):
    release = asyncio.Event()
    started = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        started.set()
        await release.wait()
        clock.advance(seconds)

    limiter = RateLimiter({"b": RateLimit(60, burst=1, headroom_tokens=0)}, MemoryBucketStore(clock=clock),
                          clock=clock, sleep=gated_sleep)  # fmt: skip
    await limiter.acquire("b")
    waiter = asyncio.create_task(limiter.acquire("b", max_wait=10))
    await started.wait()
    await limiter.penalise("b", 5.0)
    release.set()
    waited = await waiter
    assert waited >= 5.0
    assert clock.sleeps[0] == pytest.approx(1.0)


async def test_a_retry_after_beyond_max_wait_rejects_immediately(clock):
    limiter = _limiter(clock)
    await limiter.penalise("oracle", 30.0)
    with pytest.raises(UpstreamRateLimited):
        await limiter.acquire("oracle", max_wait=5.0)
    assert clock.sleeps == []


async def test_a_backend_without_a_configured_limit_is_never_held_back_by_rate(clock):
    limiter = _limiter(clock)
    for _ in range(100):
        assert await limiter.acquire("generic", max_wait=0.0) == 0.0
    assert clock.sleeps == []


async def test_a_backend_without_a_configured_limit_is_held_by_a_penalty_then_free(clock):
    limiter = _limiter(clock)
    await limiter.penalise("generic", 2.0)
    assert await limiter.held_for("generic") == pytest.approx(2.0)
    assert await limiter.acquire("generic") == pytest.approx(2.0)
    assert await limiter.held_for("generic") == 0.0
    for _ in range(10):
        assert await limiter.acquire("generic", max_wait=0.0) == 0.0


async def test_a_penalty_past_the_wait_bound_rejects_a_backend_without_a_limit_at_once(clock):
    limiter = _limiter(clock)
    await limiter.penalise("generic", 30.0)
    with pytest.raises(UpstreamRateLimited):
        await limiter.acquire("generic", max_wait=5.0)
    assert clock.sleeps == []


def test_retry_after_is_capped_by_the_configured_maximum():
    assert parse_retry_after("30", 0.0, cap=2.0) == 2.0
    assert parse_retry_after(None, 0.0, cap=0.5) == 0.5
    assert parse_retry_after("1", 0.0, cap=2.0) == 1.0


def test_retry_after_accepts_delay_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(42.0)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after(past, now) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e9x", "Wed, 99 Foo 2025 25:61:00 GMT"])
def test_unusable_retry_after_falls_back_to_the_default(value):
    assert parse_retry_after(value, 0.0) == DEFAULT_RETRY_AFTER_SECONDS


def test_retry_after_is_capped():
    assert parse_retry_after("999999", 0.0) == MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"oracle": {"requests_per_minute": 0}}, "rate_limit.limits.oracle.requests_per_minute"),
        ({"oracle": {"requests_per_minute": 100, "burst": 0}}, "rate_limit.limits.oracle.burst"),
        (
            {"oracle": {"requests_per_minute": 100, "headroom_tokens": -1}},
            "rate_limit.limits.oracle.headroom_tokens",
        ),
        ({"oracle": {"rpm": 100}}, "rate_limit.limits.oracle"),
    ],
)
def test_invalid_rate_limit_settings_name_the_key(limits, key):
    with pytest.raises(ConfigError) as info:
        RateLimiterSettings(limits=limits)
    assert info.value.key == key


def test_settings_build_limits_and_validate_the_store():
    settings = RateLimiterSettings(limits={"oracle": {"requests_per_minute": 100}})
    assert settings.limits["oracle"] == ORACLE
    with pytest.raises(ConfigError) as info:
        RateLimiterSettings(store="redis")
    assert info.value.key == "rate_limit.redis_url_env"
    with pytest.raises(ConfigError) as info:
        RateLimiterSettings(max_wait_seconds=-1)
    assert info.value.key == "rate_limit.max_wait_seconds"
