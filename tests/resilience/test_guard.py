"""The backend guard: which upstream answers hold the backend, for how long, and who waits."""

from __future__ import annotations

import email.utils

import pytest

from mcp_fhir._exceptions import (
    CircuitOpen,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcp_fhir.resilience.breaker import CircuitBreaker
from mcp_fhir.resilience.guard import BackendGuard
from mcp_fhir.resilience.ratelimit import DEFAULT_RETRY_AFTER_SECONDS, MemoryBucketStore, RateLimiter

NOW = 1_700_000_000.0


def _guard(clock, *, max_retry_after: float = 120.0) -> BackendGuard:
    limiter = RateLimiter({}, MemoryBucketStore(clock=clock), clock=clock, sleep=clock.sleep)
    return BackendGuard(
        "b-guard",
        limiter=limiter,
        breaker=CircuitBreaker("b-guard", clock=clock),
        max_retry_after=max_retry_after,
        wall_clock=lambda: NOW,
        clock=clock,
        sleep=clock.sleep,
    )


def _answer(cls: type, status: int | None, retry_after: str | None) -> Exception:
    exc = cls("upstream said so", status=status) if status is not None else cls("upstream said so")
    exc.retry_after = retry_after
    return exc


@pytest.mark.parametrize(
    ("exc", "hold"),
    [
        (_answer(UpstreamRateLimited, 429, "3"), 3.0),
        (_answer(UpstreamRateLimited, 429, None), DEFAULT_RETRY_AFTER_SECONDS),
        (_answer(UpstreamUnavailable, 503, "3"), 3.0),
        (_answer(UpstreamUnavailable, 503, email.utils.formatdate(NOW + 4, usegmt=True)), 4.0),
        (_answer(UpstreamUnavailable, 503, None), None),
        (_answer(UpstreamUnavailable, 500, "2"), 2.0),
        (_answer(UpstreamTimeout, None, None), None),
        (_answer(UpstreamBadResponse, None, "5"), None),
        (_answer(CircuitOpen, None, None), None),
    ],
)
def test_only_a_429_or_a_5xx_carrying_retry_after_holds_the_backend(clock, exc, hold):
    assert _guard(clock).hold_seconds(exc) == hold


def test_the_hold_is_capped_by_the_configured_maximum(clock):
    guard = _guard(clock, max_retry_after=2.0)
    assert guard.hold_seconds(_answer(UpstreamUnavailable, 503, "600")) == 2.0
    assert guard.hold_seconds(_answer(UpstreamRateLimited, 429, "600")) == 2.0


async def test_a_503_with_retry_after_holds_the_next_call_until_it_expires(clock):
    guard = _guard(clock)
    answers = [_answer(UpstreamUnavailable, 503, "3")]
    sent_at: list[float] = []

    async def call() -> str:
        sent_at.append(clock())
        if answers:
            raise answers.pop(0)
        return "ok"

    with pytest.raises(UpstreamUnavailable):
        await guard.run(call, idempotent=False)  # a write: never retried, but it sets the hold
    assert await guard.run(call, idempotent=True) == "ok"
    assert sent_at[1] - sent_at[0] >= 3.0


async def test_a_read_that_gets_a_retry_after_is_retried_no_sooner(clock):
    guard = _guard(clock)
    answers = [_answer(UpstreamRateLimited, 429, "2")]
    sent_at: list[float] = []

    async def call() -> str:
        sent_at.append(clock())
        if answers:
            raise answers.pop(0)
        return "ok"

    assert await guard.run(call, idempotent=True) == "ok"
    assert len(sent_at) == 2
    assert sent_at[1] - sent_at[0] >= 2.0
