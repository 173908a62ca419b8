"""One backend's guard on every EHR request: rate limit → circuit breaker → request, with retries.

Retries are for idempotent reads only, and never when our own breaker or limiter said no.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from mcp_fhir._exceptions import CircuitOpen, MCPFhirError, UpstreamRateLimited, UpstreamUnavailable
from mcp_fhir.resilience.breaker import CircuitBreaker
from mcp_fhir.resilience.ratelimit import RateLimiter, parse_retry_after
from mcp_fhir.resilience.retry import retry_idempotent


def _retryable(exc: BaseException) -> bool:
    """Reads are retried on outages and on the EHR's own 429; never when our breaker or limiter said no."""
    if isinstance(exc, CircuitOpen):
        return False
    if isinstance(exc, UpstreamRateLimited):
        return isinstance(exc, MCPFhirError) and exc.details.get("status") == 429
    return isinstance(exc, UpstreamUnavailable)


class BackendGuard:
    """Rate limit → circuit breaker → request, with jittered retries for idempotent reads only."""

    def __init__(self, backend: str, *, limiter: RateLimiter | None, breaker: CircuitBreaker) -> None:
        self.backend = backend
        self.limiter = limiter
        self.breaker = breaker

    async def _once(self, call: Callable[[], Awaitable[Any]]) -> Any:
        if self.limiter is not None:
            await self.limiter.acquire(self.backend)
        async with self.breaker.guard():
            try:
                return await call()
            except UpstreamRateLimited as exc:
                # The EHR's Retry-After, as seconds: the retry loop waits it out, and a limiter holds it for all.
                wait = parse_retry_after(
                    exc.retry_after if isinstance(exc.retry_after, str) else None, time.time()
                )
                exc.retry_after = wait
                if self.limiter is not None:
                    await self.limiter.penalise(self.backend, wait)
                raise

    async def run(self, call: Callable[[], Awaitable[Any]], *, idempotent: bool) -> Any:
        if not idempotent:
            return await self._once(call)
        return await retry_idempotent(lambda: self._once(call), retryable=_retryable)
