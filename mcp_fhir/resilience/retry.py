"""Retries for idempotent reads, on tenacity; writes are never retried.

:func:`retry_idempotent` retries a read with tenacity's full-jitter exponential backoff
(``wait_random_exponential``: uniform in ``[0, min(max_delay, base * 2**(attempt-1))]``) under a
total deadline: it never sleeps past the deadline and never starts an attempt after it, and it
re-raises the last error. Only errors that ``retryable`` accepts are retried. If the error carries a
``retry_after`` attribute (seconds, set by the backend guard from the EHR's Retry-After), the next
attempt waits at least that long, or, if that would cross the deadline, the error is re-raised at once.

Writes (create, update, patch, delete, transactions) are **never** retried: a write whose answer
was lost may have been applied, and repeating it could duplicate or overwrite clinical data. The
backend guard calls them once.

The deadline bounds the retry loop, not a single attempt: each attempt is bounded by the HTTP
client's own deadline (``backends.NAME.total_timeout``).

Why tenacity, not stamina: stamina is an opinionated layer over tenacity that fixes the wait and
stop policies; we need the wait to be the larger of the backoff and the EHR's Retry-After, and a stop
that looks at the upcoming sleep against our own (injectable) clock, which tenacity's ``wait``/``stop``
callables and ``sleep`` argument give directly. What stays ours is only that policy: the two small
callables below.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

__all__ = [
    "DEFAULT_BASE_DELAY_S",
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DELAY_S",
    "retry_idempotent",
]

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY_S = 0.1
DEFAULT_MAX_DELAY_S = 2.0
DEFAULT_DEADLINE_S = 10.0


def _retry_after(exc: BaseException | None) -> float | None:
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, bool) or not isinstance(hint, int | float) or not math.isfinite(hint):
        return None
    return max(0.0, float(hint))


async def retry_idempotent(
    call: Callable[[], Awaitable[T]],
    *,
    deadline_s: float = DEFAULT_DEADLINE_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    base_delay_s: float = DEFAULT_BASE_DELAY_S,
    max_delay_s: float = DEFAULT_MAX_DELAY_S,
    retryable: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``call`` until it succeeds, fails with a non-retryable error, or attempts or time run out.

    For idempotent reads only. Re-raises the last error.
    """
    deadline = clock() + deadline_s
    backoff = wait_random_exponential(multiplier=base_delay_s, max=max_delay_s)

    def wait(state: RetryCallState) -> float:
        hint = _retry_after(state.outcome.exception() if state.outcome else None)
        delay = backoff(state)
        return delay if hint is None else max(delay, hint)

    def stop(state: RetryCallState) -> bool:
        return state.attempt_number >= max_attempts or clock() + state.upcoming_sleep >= deadline

    async def attempt() -> T:  # a coroutine function, so that tenacity awaits it (a lambda it would not)
        return await call()

    retrying = AsyncRetrying(
        retry=retry_if_exception(retryable), wait=wait, stop=stop, sleep=sleep, reraise=True
    )
    return await retrying(attempt)
