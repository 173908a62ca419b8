from __future__ import annotations

import pytest

from mcp_fhir._exceptions import ConfigError, UpstreamTimeout
from mcp_fhir.resilience.retry import (
    DEFAULT_BASE_DELAY_S,
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_DELAY_S,
    RetrySettings,
    backoff_delay,
    retry_idempotent,
    run_write_once,
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


def test_named_defaults():
    assert (DEFAULT_MAX_ATTEMPTS, DEFAULT_BASE_DELAY_S, DEFAULT_MAX_DELAY_S, DEFAULT_DEADLINE_S) == (
        3,
        0.1,
        2.0,
        10.0,
    )


async def test_a_retryable_error_is_retried_until_success(clock):
    call = Flaky(UpstreamTimeout("slow"), UpstreamTimeout("slow"))
    result = await retry_idempotent(
        call, retryable=_is_timeout, sleep=clock.sleep, clock=clock, rand=lambda: 0.5
    )
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


async def test_retries_stop_at_the_deadline_and_never_sleep_past_it(clock):
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
            rand=lambda: 1.0,
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


@pytest.mark.parametrize("r", [0.0, 0.25, 0.999999, 1.0, 7.0, -3.0])
def test_jitter_is_bounded_by_the_exponential_cap(r):
    for attempt in range(1, 12):
        cap = min(2.0, 0.1 * 2 ** (attempt - 1))
        delay = backoff_delay(attempt, 0.1, 2.0, lambda: r)
        assert 0.0 <= delay <= cap


def test_full_jitter_spreads_delays_across_the_range():
    import random

    rng = random.Random(7)
    delays = [backoff_delay(3, 0.1, 2.0, rng.random) for _ in range(500)]
    assert max(delays) <= 0.4
    assert min(delays) < 0.05 and max(delays) > 0.35


async def test_writes_run_exactly_once_even_when_they_fail():
    call = Flaky(UpstreamTimeout("lost answer"))
    with pytest.raises(UpstreamTimeout):
        await run_write_once(call)
    assert call.calls == 1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_attempts": 0}, "retry.max_attempts"),
        ({"max_attempts": 11}, "retry.max_attempts"),
        ({"base_delay_s": -1}, "retry.base_delay_s"),
        ({"deadline_s": 1e9}, "retry.deadline_s"),
        ({"base_delay_s": 1.0, "max_delay_s": 0.5}, "retry.max_delay_s"),
    ],
)
def test_invalid_retry_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        RetrySettings(**kwargs)
    assert info.value.key == key
