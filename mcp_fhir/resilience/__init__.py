"""Resilience in front of the EHR, composed by the EHR client in this order:

    cache → (Retry-After hold + rate limit) → circuit breaker → (retry on tenacity, reads only) → HTTP

Each piece is small, has an injectable clock, and a memory or Redis store. ``guard.BackendGuard``
composes the middle three for one backend; what is retried and waited for is in its docstring and in
docs/operator-guide.md.
"""

from mcp_fhir.resilience.breaker import (
    BreakerSettings,
    BreakerSnapshot,
    BreakerState,
    CircuitBreaker,
    is_upstream_failure,
)
from mcp_fhir.resilience.cache import (
    Cache,
    CacheEntry,
    CacheKey,
    CacheLookup,
    CacheSettings,
    MemoryStore,
    RedisStore,
    canonical_query,
)
from mcp_fhir.resilience.ratelimit import (
    MemoryBucketStore,
    RateLimit,
    RateLimiter,
    RateLimiterSettings,
    RedisBucketStore,
    parse_retry_after,
)
from mcp_fhir.resilience.retry import retry_idempotent

__all__ = [
    "BreakerSettings",
    "BreakerSnapshot",
    "BreakerState",
    "Cache",
    "CacheEntry",
    "CacheKey",
    "CacheLookup",
    "CacheSettings",
    "CircuitBreaker",
    "MemoryBucketStore",
    "MemoryStore",
    "RateLimit",
    "RateLimiter",
    "RateLimiterSettings",
    "RedisBucketStore",
    "RedisStore",
    "canonical_query",
    "is_upstream_failure",
    "parse_retry_after",
    "retry_idempotent",
]
