"""A token bucket per backend, so the sidecar never exceeds an EHR's published request limit.

The bucket is kept as a GCRA ("virtual scheduling") state: a theoretical arrival time ``tat``.
Every caller *reserves* its release time atomically when it calls :meth:`RateLimiter.acquire`,
so callers are released in the order they asked (FIFO), and a caller whose release would be
more than ``max_wait`` seconds away is rejected at once with :class:`UpstreamRateLimited`
instead of sleeping pointlessly.

Headroom: our bucket holds ``DEFAULT_HEADROOM_TOKENS`` fewer tokens than the upstream's burst.
The long-run rate is exactly the configured limit, but network jitter of up to one token
interval (0.6 s at 100/min) cannot make the upstream's own bucket, which sees our requests a
little later and in a slightly different order, run dry.

After a 429 (or a 503 with Retry-After), :meth:`RateLimiter.penalise` (with
:func:`parse_retry_after`) stops every release until the Retry-After time and restarts the bucket
empty from there. Callers already sleeping on an older reservation notice the penalty when they
wake and queue again. A backend with no configured limit still has a schedule, with no rate: it
is only ever held by such a penalty, so one backend's 429 holds every call to it, in this process
or (with the Redis store) in every replica.

Stores: :class:`MemoryBucketStore` (one process, injectable clock) and :class:`RedisBucketStore`
(several replicas share one limit; a Lua script updates the bucket atomically using the Redis
server's TIME). If Redis cannot be reached the call fails closed with ``upstream_unavailable``.

Why this is hand-written rather than on the ``limits`` library (issue #15 §7 asked for it; checked
with limits 5.8, memory and Redis storage alike):

* ``limits`` windows are whole seconds (``RateLimitItem.multiples`` is an ``int``). An EHR publishes
  a token bucket, burst B at rate r, whose equivalent window is ``(B - 1) / r`` seconds: 0.5 s for
  600/min with burst 6. ``RateLimitItemPerSecond(5, 0.5)`` silently becomes a window of 0 s, i.e. no
  limit; the nearest whole-second window either halves the rate or lets through a burst larger than
  the EHR's own bucket, which then answers 429.
* Where the window is whole (Oracle Health, 100/min, burst 16 → "15 per 9 seconds"), a moving window
  lets 15 calls through and then nothing for 9 s: measured, the 16th ``hit`` is refused with
  ``reset_time`` 9.0 s ahead, where this bucket releases it 0.6 s later. With the default 5 s bounded
  wait, calls this limiter serves would fail with ``upstream_rate_limited``.
* ``limits`` answers yes or no (``hit``) and a reset time; it cannot *reserve* a place. Waiting callers
  would poll and race, so there would be neither FIFO order nor an exact bounded wait.
* It has no penalty: the Retry-After hold that every replica must honour (issue #19) would be a
  second store beside it anyway.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from mcp_fhir import metrics
from mcp_fhir._exceptions import ConfigError, UpstreamRateLimited, UpstreamUnavailable
from mcp_fhir.resilience.stores import redis_from_env

__all__ = [
    "DEFAULT_BURST_FRACTION",
    "DEFAULT_HEADROOM_TOKENS",
    "DEFAULT_MAX_WAIT_SECONDS",
    "DEFAULT_REDIS_KEY_PREFIX",
    "DEFAULT_RETRY_AFTER_SECONDS",
    "MAX_RETRY_AFTER_SECONDS",
    "BucketStore",
    "MemoryBucketStore",
    "RateLimit",
    "RateLimiter",
    "RateLimiterSettings",
    "RedisBucketStore",
    "Reservation",
    "parse_retry_after",
]

DEFAULT_MAX_WAIT_SECONDS = 5.0
DEFAULT_BURST_FRACTION = 1 / 6  # a burst of ten seconds' worth of requests: 16 for 100/min
DEFAULT_HEADROOM_TOKENS = 1
DEFAULT_RETRY_AFTER_SECONDS = 1.0  # a 429 without a usable Retry-After
MAX_RETRY_AFTER_SECONDS = 300.0  # a hostile or broken Retry-After cannot stop us for longer
MAX_REQUESTS_PER_MINUTE = 1_000_000.0
MAX_WAIT_LIMIT_SECONDS = 300.0
DEFAULT_REDIS_KEY_PREFIX = "mcpfhir:ratelimit:"
_EPSILON_SECONDS = 1e-9  # float drift in the schedule; far below any clock resolution that matters


def parse_retry_after(value: str | None, now: float, *, cap: float = MAX_RETRY_AFTER_SECONDS) -> float:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date.

    ``now`` is wall-clock epoch seconds (used for the HTTP-date form). A missing or unparseable
    value gives ``DEFAULT_RETRY_AFTER_SECONDS``; the result is clamped to
    ``[0, min(cap, MAX_RETRY_AFTER_SECONDS)]``.
    """
    if value is None:
        return min(DEFAULT_RETRY_AFTER_SECONDS, cap)
    text = value.strip()
    if not text:
        return min(DEFAULT_RETRY_AFTER_SECONDS, cap)
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return min(DEFAULT_RETRY_AFTER_SECONDS, cap)
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            return min(DEFAULT_RETRY_AFTER_SECONDS, cap)
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), cap, MAX_RETRY_AFTER_SECONDS)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RateLimit:
    """A backend's limit: ``requests_per_minute`` and a burst (default: limit * DEFAULT_BURST_FRACTION)."""

    requests_per_minute: float
    burst: int | None = None
    headroom_tokens: int = DEFAULT_HEADROOM_TOKENS

    def __post_init__(self) -> None:
        self.validate("rate_limit")

    def validate(self, prefix: str) -> None:
        rpm = self.requests_per_minute
        if not _is_number(rpm) or not (0 < rpm <= MAX_REQUESTS_PER_MINUTE):
            raise ConfigError(
                f"{prefix}.requests_per_minute", f"must be > 0 and <= {MAX_REQUESTS_PER_MINUTE:g}"
            )
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise ConfigError(f"{prefix}.burst", "must be a positive integer")
        if (
            isinstance(self.headroom_tokens, bool)
            or not isinstance(self.headroom_tokens, int)
            or self.headroom_tokens < 0
        ):
            raise ConfigError(f"{prefix}.headroom_tokens", "must be a non-negative integer")

    @property
    def upstream_burst(self) -> int:
        return (
            self.burst
            if self.burst is not None
            else max(1, int(self.requests_per_minute * DEFAULT_BURST_FRACTION))
        )

    @property
    def capacity(self) -> int:
        """Tokens our bucket holds: the upstream's burst less the headroom (at least one)."""
        return max(1, self.upstream_burst - self.headroom_tokens)

    @property
    def interval(self) -> float:
        """Seconds per token."""
        return 60.0 / self.requests_per_minute

    @property
    def tolerance(self) -> float:
        """GCRA tolerance: how far ahead of schedule a burst may run."""
        return (self.capacity - 1) * self.interval


def _interval(limit: RateLimit | None) -> float:
    """Seconds per token; 0 for a backend with no limit (only a penalty ever holds it)."""
    return 0.0 if limit is None else limit.interval


def _tolerance(limit: RateLimit | None) -> float:
    return 0.0 if limit is None else limit.tolerance


@dataclass(frozen=True)
class Reservation:
    """A reserved release ``wait`` seconds from now, valid while the backend's ``epoch`` is unchanged."""

    wait: float
    epoch: int


class BucketStore(Protocol):
    """A backend's schedule; ``limit`` is ``None`` for a backend that only a penalty holds."""

    async def reserve(self, backend: str, limit: RateLimit | None, max_wait: float) -> Reservation | None:
        """Reserve the next release, or ``None`` (and change nothing) if it is more than ``max_wait`` away."""
        ...

    async def penalise(self, backend: str, limit: RateLimit | None, retry_after: float) -> None: ...

    async def next_release(self, backend: str, limit: RateLimit | None) -> float:
        """Seconds until the next release would be allowed (0 when one is free now); changes nothing."""
        ...

    async def epoch(self, backend: str) -> int: ...

    async def aclose(self) -> None: ...


@dataclass
class _Bucket:
    tat: float = -math.inf
    epoch: int = 0


class MemoryBucketStore:
    """Buckets in this process. No awaits inside an update, so each is atomic on the event loop."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    async def reserve(self, backend: str, limit: RateLimit | None, max_wait: float) -> Reservation | None:
        bucket = self._buckets.setdefault(backend, _Bucket())
        now = self._clock()
        tat = max(bucket.tat, now)
        wait = tat - _tolerance(limit) - now
        wait = 0.0 if wait < _EPSILON_SECONDS else wait
        if wait > max_wait:
            return None
        bucket.tat = tat + _interval(limit)
        return Reservation(wait, bucket.epoch)

    async def penalise(self, backend: str, limit: RateLimit | None, retry_after: float) -> None:
        bucket = self._buckets.setdefault(backend, _Bucket())
        bucket.tat = max(bucket.tat, self._clock() + retry_after + _tolerance(limit))
        bucket.epoch += 1

    async def next_release(self, backend: str, limit: RateLimit | None) -> float:
        bucket = self._buckets.get(backend)
        if bucket is None:
            return 0.0
        return max(0.0, bucket.tat - _tolerance(limit) - self._clock())

    async def epoch(self, backend: str) -> int:
        return self._buckets.setdefault(backend, _Bucket()).epoch

    async def aclose(self) -> None:
        self._buckets.clear()


_NOW_LUA = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS[1] bucket hash; ARGV interval, tolerance, max_wait. Returns {reserved 1|0, wait, epoch}.
_RESERVE_LUA = (
    _NOW_LUA
    + """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0.000000001 then wait = 0 end
if wait > max_wait then return {0, string.format('%.6f', wait), epoch} end
tat = tat + interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now + tolerance + 60) * 1000))
return {1, string.format('%.6f', wait), epoch}
"""
)

# KEYS[1] bucket hash; ARGV tolerance. Returns the seconds until the next release, as a string.
_NEXT_RELEASE_LUA = (
    _NOW_LUA
    + """
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
local wait = tat - tonumber(ARGV[1]) - now
if wait < 0 then wait = 0 end
return string.format('%.6f', wait)
"""
)

# KEYS[1] bucket hash; ARGV retry_after, tolerance.
_PENALISE_LUA = (
    _NOW_LUA
    + """
local until_tat = now + tonumber(ARGV[1]) + tonumber(ARGV[2])
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
if tat < until_tat then tat = until_tat end
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat))
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now + 60) * 1000))
return 1
"""
)


class RedisBucketStore:
    """Buckets shared by every replica: ``<prefix><backend>`` is a hash of ``tat`` and ``epoch``."""

    def __init__(self, client: Any, *, prefix: str = DEFAULT_REDIS_KEY_PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._reserve = client.register_script(_RESERVE_LUA)
        self._penalise = client.register_script(_PENALISE_LUA)
        self._next_release = client.register_script(_NEXT_RELEASE_LUA)

    async def reserve(self, backend: str, limit: RateLimit | None, max_wait: float) -> Reservation | None:
        args = [repr(_interval(limit)), repr(_tolerance(limit)), repr(max_wait)]
        reply = await self._call(self._reserve, backend, args)
        reserved, wait, epoch = reply
        if int(reserved) != 1:
            return None
        return Reservation(float(wait), int(epoch))

    async def penalise(self, backend: str, limit: RateLimit | None, retry_after: float) -> None:
        await self._call(self._penalise, backend, [repr(retry_after), repr(_tolerance(limit))])

    async def next_release(self, backend: str, limit: RateLimit | None) -> float:
        return float(await self._call(self._next_release, backend, [repr(_tolerance(limit))]))

    async def epoch(self, backend: str) -> int:
        from redis.exceptions import RedisError

        try:
            raw = await self._redis.hget(self._prefix + backend, "epoch")
        except RedisError as exc:
            raise UpstreamUnavailable("rate-limit store unreachable", backend=backend) from exc
        return int(raw or 0)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _call(self, script: Any, backend: str, args: list[str]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=[self._prefix + backend], args=args)
        except RedisError as exc:
            raise UpstreamUnavailable("rate-limit store unreachable", backend=backend) from exc


@dataclass(frozen=True)
class RateLimiterSettings:
    """The ``rate_limit`` section: a limit per backend, a store, and the default bounded wait."""

    limits: Mapping[str, RateLimit | Mapping[str, Any]] = field(default_factory=dict)
    store: Literal["memory", "redis"] = "memory"
    redis_url_env: str | None = None
    redis_key_prefix: str = DEFAULT_REDIS_KEY_PREFIX
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS

    def __post_init__(self) -> None:
        built: dict[str, RateLimit] = {}
        for name, raw in self.limits.items():
            prefix = f"rate_limit.limits.{name}"
            try:
                built[name] = raw if isinstance(raw, RateLimit) else RateLimit(**raw)
            except TypeError as exc:
                raise ConfigError(prefix, "has an unknown or missing field") from exc
            except ConfigError as exc:
                raise ConfigError(f"{prefix}.{exc.key.rsplit('.', 1)[-1]}", exc.rule) from exc
        object.__setattr__(self, "limits", built)
        if self.store not in ("memory", "redis"):
            raise ConfigError("rate_limit.store", "must be 'memory' or 'redis'")
        if self.store == "redis" and not self.redis_url_env:
            raise ConfigError("rate_limit.redis_url_env", "is required when rate_limit.store is 'redis'")
        if not _is_number(self.max_wait_seconds) or not (
            0 <= self.max_wait_seconds <= MAX_WAIT_LIMIT_SECONDS
        ):
            raise ConfigError(
                "rate_limit.max_wait_seconds", f"must be between 0 and {MAX_WAIT_LIMIT_SECONDS:g}"
            )


class RateLimiter:
    """``await limiter.acquire(backend)`` before every EHR request; ``penalise`` after a 429."""

    def __init__(
        self,
        limits: Mapping[str, RateLimit],
        store: BucketStore | None = None,
        *,
        max_wait: float = DEFAULT_MAX_WAIT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._limits = dict(limits)
        self._store: BucketStore = store or MemoryBucketStore(clock=clock)
        self._max_wait = max_wait
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def from_settings(
        cls, settings: RateLimiterSettings, *, environ: Mapping[str, str] | None = None
    ) -> RateLimiter:
        limits = {k: v for k, v in settings.limits.items() if isinstance(v, RateLimit)}
        store: BucketStore | None = None
        if settings.store == "redis":
            client = redis_from_env(settings.redis_url_env, "rate_limit.redis_url_env", environ=environ)
            store = RedisBucketStore(client, prefix=settings.redis_key_prefix)
        return cls(limits, store, max_wait=settings.max_wait_seconds)

    def limit_for(self, backend: str) -> RateLimit | None:
        """The backend's limit, or ``None``: then only a penalty (a 429's Retry-After) ever holds it."""
        return self._limits.get(backend)

    async def acquire(self, backend: str, *, max_wait: float | None = None) -> float:
        """Wait for this backend's next slot; return the seconds waited.

        Raises :class:`UpstreamRateLimited` at once (without sleeping) if the slot is more than
        ``max_wait`` seconds away, or becomes so because of a penalty while waiting.
        """
        limit = self.limit_for(backend)
        budget = self._max_wait if max_wait is None else max(0.0, max_wait)
        start = self._clock()
        while True:
            remaining = budget - (self._clock() - start)
            reservation = await self._store.reserve(backend, limit, max(0.0, remaining))
            if reservation is None:
                metrics.RATE_LIMIT_REJECTIONS.labels(backend).inc()
                raise UpstreamRateLimited(
                    "rate limit would be exceeded beyond the allowed wait", backend=backend, max_wait=budget
                )
            if reservation.wait > 0:
                await self._sleep(reservation.wait)
            if reservation.wait <= 0 or await self._store.epoch(backend) == reservation.epoch:
                waited = max(0.0, self._clock() - start)
                metrics.RATE_LIMIT_WAITS.labels(backend).observe(waited)
                return waited

    async def penalise(self, backend: str, retry_after_seconds: float) -> None:
        """After a 429: release nothing for ``retry_after_seconds``, then restart with an empty bucket."""
        retry_after = min(max(float(retry_after_seconds), 0.0), MAX_RETRY_AFTER_SECONDS)
        await self._store.penalise(backend, self.limit_for(backend), retry_after)

    async def held_for(self, backend: str) -> float:
        """Seconds until this backend's next request may be sent (0: one may go now)."""
        return await self._store.next_release(backend, self.limit_for(backend))

    async def aclose(self) -> None:
        await self._store.aclose()
