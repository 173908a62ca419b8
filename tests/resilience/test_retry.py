from __future__ import annotations

import random

import pytest

from mcp_fhir._exceptions import UpstreamTimeout
from mcp_fhir.resilience.retry import (
    DEFAULT_BASE_DELAY_S,
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DELAY_S,
    retry_idempotent,
)


class Flaky:
    """Fails with the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class Hinted(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("throttled")
        self.retry_after = retry_after


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamTimeout)


def _jitter(monkeypatch: pytest.MonkeyPatch, r: float) -> None:
    """Make the full jitter deterministic: the wait is fraction ``r`` of its window."""
    monkeypatch.setattr(random, "uniform", lambda low, high: low + (high - low) * r)


def test_named_defaults():
    assert (DEFAULT_MAX_ATTEMPTS, DEFAULT_BASE_DELAY_S, DEFAULT_MAX_DELAY_S, DEFAULT_DEADLINE_S) == (
        3,
        0.1,
        2.0,
        10.0,
    )


async def test_a_retryable_error_is_retried_until_success(clock, monkeypatch):
    _jitter(monkeypatch, 0.5)
    call = Flaky(UpstreamTimeout("slow"), UpstreamTimeout("slow"))
    result = await retry_idempotent(call, retryable=_is_timeout, sleep=clock.sleep, clock=clock)
    assert result == "ok"
    assert call.calls == 3
    assert clock.sleeps == [pytest.approx(0.05), pytest.approx(0.1)]


async def test_a_non_retryable_error_is_raised_after_one_attempt(clock):
    call = Flaky(ValueError("bad"), UpstreamTimeout("slow"))
    with pytest.raises(ValueError):
        await retry_idempotent(call, retryable=_is_timeout, sleep=clock.sleep, clock=clock)
    assert call.calls == 1
    assert clock.sleeps == []


async def test_the_last_error_is_reraised_when_attempts_run_out(clock):
    first, last = UpstreamTimeout("first"), UpstreamTimeout("last")
    call = Flaky(first, UpstreamTimeout("second"), last, UpstreamTimeout("never"))
    with pytest.raises(UpstreamTimeout) as info:
        await retry_idempotent(call, max_attempts=3, retryable=_is_timeout, sleep=clock.sleep, clock=clock)
    assert info.value is last
    assert call.calls == 3


async def test_retries_stop_at_the_deadline_and_never_sleep_past_it(clock, monkeypatch):
    _jitter(monkeypatch, 1.0)
    start = clock()
    call = Flaky(*(UpstreamTimeout(str(i)) for i in range(50)))
    with pytest.raises(UpstreamTimeout):
        await retry_idempotent(
            call,
            deadline_s=1.0,
            max_attempts=50,
            base_delay_s=0.3,
            max_delay_s=0.3,
            retryable=_is_timeout,
            sleep=clock.sleep,
            clock=clock,
        )
    assert clock() - start < 1.0
    assert call.calls == 4  # sleeps at 0.3, 0.6, 0.9; a fourth would end at 1.2


async def test_a_retry_after_hint_is_honoured(clock):
    call = Flaky(Hinted(retry_after=1.5))
    assert await retry_idempotent(call, retryable=lambda e: True, sleep=clock.sleep, clock=clock) == "ok"
    assert clock.sleeps == [1.5]


async def test_a_retry_after_hint_past_the_deadline_raises_at_once(clock):
    call = Flaky(Hinted(retry_after=30))
    with pytest.raises(Hinted):
        await retry_idempotent(call, deadline_s=10, retryable=lambda e: True, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == []
    assert call.calls == 1


@pytest.mark.parametrize("r", [0.0, 0.25, 0.999999, 1.0])
async def test_jitter_is_bounded_by_the_exponential_cap(clock, monkeypatch, r):
    _jitter(monkeypatch, r)
    call = Flaky(*(UpstreamTimeout(str(i)) for i in range(9)))
    await retry_idempotent(
        call, max_attempts=10, deadline_s=100, retryable=_is_timeout, sleep=clock.sleep, clock=clock
    )
    for attempt, delay in enumerate(clock.sleeps, start=1):
        assert 0.0 <= delay <= min(2.0, 0.1 * 2 ** (attempt - 1)) + 1e-12


async def test_full_jitter_spreads_delays_across_the_range(clock):
    delays = []
    for _ in range(300):
        clock.sleeps.clear()
        await retry_idempotent(
            Flaky(UpstreamTimeout("1"), UpstreamTimeout("2"), UpstreamTimeout("3")),
            max_attempts=4,
            retryable=_is_timeout,
            sleep=clock.sleep,
            clock=clock,
        )
        delays.append(clock.sleeps[2])  # after the third failure: window 0.4 s
    assert max(delays) <= 0.4
    assert min(delays) < 0.05 and max(delays) > 0.35


async def test_a_plain_function_returning_an_awaitable_is_awaited_and_retried(clock):
    call = Flaky(UpstreamTimeout("slow"))
    assert (
        await retry_idempotent(lambda: call(), retryable=_is_timeout, sleep=clock.sleep, clock=clock) == "ok"
    )
    assert call.calls == 2


async def test_a_write_through_the_guard_runs_exactly_once_even_when_it_fails():
    from mcp_fhir.resilience.breaker import CircuitBreaker
    from mcp_fhir.resilience.guard import BackendGuard

    guard = BackendGuard("b-write-once", limiter=None, breaker=CircuitBreaker("b-write-once"))
    call = Flaky(UpstreamTimeout("lost answer"))
    with pytest.raises(UpstreamTimeout):
        await guard.run(call, idempotent=False)
    assert call.calls == 1
