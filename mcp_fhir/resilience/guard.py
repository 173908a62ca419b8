"""One backend's guard on every EHR request: hold → rate limit → circuit breaker → request, with retries.

What is waited for:

* **Retry-After**, on a 429 and on any 5xx that carries it (a 503 most of all), as delay-seconds or
  an HTTP-date, capped by the backend's ``max_retry_after``. A 429 without a usable header holds for
  ``DEFAULT_RETRY_AFTER_SECONDS``; a 5xx without one holds nothing (the retry backoff applies).
* The hold is the **backend's**, not the call's: :meth:`RateLimiter.penalise` stops every request to
  that backend until it expires, whether or not a rate limit is configured for it, and through the
  Redis store in every replica that shares the limiter. Other calls wait it out inside the limiter's
  bounded wait, or fail at once with ``upstream_rate_limited``.
* The call that received it retries (reads only) no earlier than the hold's end, or fails at once
  when that would pass the retry deadline.

Retries are for idempotent reads only, and never when our own breaker or limiter said no.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mcp_fhir._exceptions import (
    CircuitOpen,
    MCPFhirError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from mcp_fhir.resilience.breaker import CircuitBreaker
from mcp_fhir.resilience.ratelimit import MAX_RETRY_AFTER_SECONDS, RateLimiter, parse_retry_after
from mcp_fhir.resilience.retry import retry_idempotent

__all__ = ["DEFAULT_MAX_RETRY_AFTER_SECONDS", "BackendGuard"]

DEFAULT_MAX_RETRY_AFTER_SECONDS = 120.0


def _retryable(exc: BaseException) -> bool:
    """Reads are retried on outages and on the EHR's own 429; never when our breaker or limiter said no."""
    if isinstance(exc, CircuitOpen):
        return False
    if isinstance(exc, UpstreamRateLimited):
        return isinstance(exc, MCPFhirError) and exc.details.get("status") == 429
    return isinstance(exc, UpstreamUnavailable)


class BackendGuard:
    """Hold → rate limit → circuit breaker → request, with jittered retries for idempotent reads only."""

    def __init__(
        self,
        backend: str,
        *,
        limiter: RateLimiter | None,
        breaker: CircuitBreaker,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.limiter = limiter
        self.breaker = breaker
        self.max_retry_after = min(max(0.0, max_retry_after), MAX_RETRY_AFTER_SECONDS)
        self._wall_clock = wall_clock
        self._clock = clock
        self._sleep = sleep

    def hold_seconds(self, exc: UpstreamError) -> float | None:
        """How long the EHR asked us to keep away from it, capped; ``None`` when it did not ask."""
        status = exc.details.get("status")
        header = exc.retry_after if isinstance(exc.retry_after, str) else None
        if isinstance(exc, UpstreamRateLimited) and status == 429:
            return parse_retry_after(header, self._wall_clock(), cap=self.max_retry_after)
        if isinstance(exc, UpstreamUnavailable) and isinstance(status, int) and header is not None:
            return parse_retry_after(header, self._wall_clock(), cap=self.max_retry_after)
        return None

    async def _once(self, call: Callable[[], Awaitable[Any]]) -> Any:
        if self.limiter is not None:
            await self.limiter.acquire(self.backend)
        try:
            async with self.breaker.guard():
                return await call()
        except UpstreamError as exc:
            wait = self.hold_seconds(exc)
            if wait is not None:
                exc.retry_after = wait  # seconds: the retry loop waits at least this long
                if self.limiter is not None:
                    await self.limiter.penalise(self.backend, wait)
            raise

    async def run(self, call: Callable[[], Awaitable[Any]], *, idempotent: bool) -> Any:
        if not idempotent:
            return await self._once(call)
        return await retry_idempotent(
            lambda: self._once(call), retryable=_retryable, clock=self._clock, sleep=self._sleep
        )
