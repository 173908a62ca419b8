"""Retries for idempotent reads, and the explicit rule that writes are never retried.

:func:`retry_idempotent` retries a read with full-jitter exponential backoff
(``delay = rand() * min(max_delay, base * 2**(attempt-1))``) under a total deadline: it never
sleeps past the deadline and never starts an attempt after it, and it re-raises the last
error. Only errors that ``retryable`` accepts are retried. If the error carries a
``retry_after`` attribute (seconds), the next attempt waits at least that long — or, if that
would cross the deadline, the error is re-raised at once.

Writes (create, update, patch, delete, transactions) are **never** retried: a write whose answer
was lost may have been applied, and repeating it could duplicate or overwrite clinical data.
:func:`run_write_once` is the explicit API for them: it calls exactly once.

The deadline bounds the retry loop, not a single attempt: each attempt is bounded by the
HTTP client's own timeout.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mcp_fhir._exceptions import ConfigError

__all__ = [
    "DEFAULT_BASE_DELAY_S",
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DELAY_S",
    "RetrySettings",
    "backoff_delay",
    "retry_idempotent",
    "run_write_once",
]

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY_S = 0.1
DEFAULT_MAX_DELAY_S = 2.0
DEFAULT_DEADLINE_S = 10.0
MAX_ATTEMPTS_LIMIT = 10
MAX_DEADLINE_S = 120.0


@dataclass(frozen=True)
class RetrySettings:
    """The ``retry`` section (reads only); validated on construction."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay_s: float = DEFAULT_BASE_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S
    deadline_s: float = DEFAULT_DEADLINE_S

    def __post_init__(self) -> None:
        n = self.max_attempts
        if isinstance(n, bool) or not isinstance(n, int) or not (1 <= n <= MAX_ATTEMPTS_LIMIT):
            raise ConfigError("retry.max_attempts", f"must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}")
        for key, value, upper in (
            ("retry.base_delay_s", self.base_delay_s, MAX_DEADLINE_S),
            ("retry.max_delay_s", self.max_delay_s, MAX_DEADLINE_S),
            ("retry.deadline_s", self.deadline_s, MAX_DEADLINE_S),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value <= upper):
                raise ConfigError(key, f"must be between 0 and {upper:g} seconds")
        if self.max_delay_s < self.base_delay_s:
            raise ConfigError("retry.max_delay_s", "must not be smaller than retry.base_delay_s")

    async def run(self, call: Callable[[], Awaitable[T]], *, retryable: Callable[[BaseException], bool]) -> T:
        return await retry_idempotent(
            call,
            deadline_s=self.deadline_s,
            max_attempts=self.max_attempts,
            base_delay_s=self.base_delay_s,
            max_delay_s=self.max_delay_s,
            retryable=retryable,
        )


def backoff_delay(attempt: int, base_delay_s: float, max_delay_s: float, rand: Callable[[], float]) -> float:
    """Full jitter after failed attempt n: uniform in ``[0, min(max_delay, base * 2**(n-1)))``."""
    cap = min(max_delay_s, base_delay_s * (2 ** min(attempt - 1, 62)))
    return min(max(rand(), 0.0), 1.0) * cap


def _retry_after(exc: BaseException) -> float | None:
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
    rand: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``call`` until it succeeds, fails with a non-retryable error, or attempts or time run out.

    For idempotent reads only. Re-raises the last error.
    """
    deadline = clock() + deadline_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            if attempt >= max_attempts or not retryable(exc):
                raise
            delay = backoff_delay(attempt, base_delay_s, max_delay_s, rand)
            hint = _retry_after(exc)
            if hint is not None:
                delay = max(delay, hint)
            if clock() + delay >= deadline:
                raise
            await sleep(delay)


async def run_write_once(call: Callable[[], Awaitable[T]]) -> T:
    """Run a write exactly once. Writes are never retried (see the module docstring)."""
    return await call()
