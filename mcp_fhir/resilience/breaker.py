"""A circuit breaker per backend, so a failing EHR is not piled on.

    CLOSED ──(N consecutive failures, or failure rate ≥ R over the last W calls, ≥ M calls)──▶ OPEN
    OPEN ──(cool-down elapsed)──▶ HALF_OPEN: exactly one probe call is let through
    HALF_OPEN ──probe succeeds──▶ CLOSED        HALF_OPEN ──probe fails──▶ OPEN (cool-down again)

While OPEN, and in HALF_OPEN while the probe is in flight, :meth:`CircuitBreaker.before_call`
raises :class:`CircuitOpen` (``upstream_circuit_open``) without calling anything.

Only upstream failures count: 5xx, timeouts, resets and garbage. 4xx answers and policy denials
mean the upstream is alive; the caller decides by calling ``record_failure`` or
``record_success`` (or by the ``is_failure`` predicate of :meth:`CircuitBreaker.guard`).

The state is exported to ``metrics.BREAKER_STATE`` (0 closed, 1 half-open, 2 open). The clock is
injectable and monotonic. A probe that never reports back (a bug, a lost task) does not wedge
the breaker: after another cool-down a new probe is allowed.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from mcp_fhir import metrics
from mcp_fhir._exceptions import CircuitOpen, ConfigError, UpstreamBadResponse, UpstreamUnavailable

__all__ = [
    "DEFAULT_COOL_DOWN_SECONDS",
    "DEFAULT_FAILURE_RATE",
    "DEFAULT_FAILURE_THRESHOLD",
    "DEFAULT_MIN_CALLS",
    "DEFAULT_WINDOW_SIZE",
    "BreakerSettings",
    "BreakerSnapshot",
    "BreakerState",
    "CircuitBreaker",
    "is_upstream_failure",
]

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_WINDOW_SIZE = 20
DEFAULT_MIN_CALLS = 10
DEFAULT_FAILURE_RATE = 0.5
DEFAULT_COOL_DOWN_SECONDS = 30.0
MAX_COOL_DOWN_SECONDS = 3600.0


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


def is_upstream_failure(exc: BaseException) -> bool:
    """The default failure test: unreachable, timed out, reset or garbled upstream answers."""
    return isinstance(exc, UpstreamUnavailable | UpstreamBadResponse | TimeoutError | ConnectionError)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class BreakerSettings:
    """The ``breaker`` section; validated on construction."""

    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    window_size: int = DEFAULT_WINDOW_SIZE
    min_calls: int = DEFAULT_MIN_CALLS
    failure_rate: float = DEFAULT_FAILURE_RATE
    cool_down_seconds: float = DEFAULT_COOL_DOWN_SECONDS

    def __post_init__(self) -> None:
        if not _positive_int(self.failure_threshold):
            raise ConfigError("breaker.failure_threshold", "must be a positive integer")
        if not _positive_int(self.window_size):
            raise ConfigError("breaker.window_size", "must be a positive integer")
        if not _positive_int(self.min_calls) or self.min_calls > self.window_size:
            raise ConfigError(
                "breaker.min_calls", "must be a positive integer no larger than breaker.window_size"
            )
        rate = self.failure_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not (0 < rate <= 1):
            raise ConfigError("breaker.failure_rate", "must be in (0, 1]")
        cool = self.cool_down_seconds
        if (
            isinstance(cool, bool)
            or not isinstance(cool, int | float)
            or not math.isfinite(cool)
            or not (0 < cool <= MAX_COOL_DOWN_SECONDS)
        ):
            raise ConfigError("breaker.cool_down_seconds", f"must be > 0 and <= {MAX_COOL_DOWN_SECONDS:g}")


@dataclass(frozen=True)
class BreakerSnapshot:
    """A health view of one breaker."""

    backend: str
    state: str
    consecutive_failures: int
    window_calls: int
    window_failures: int
    retry_in_seconds: float


@dataclass
class CircuitBreaker:
    """One backend's breaker. ``before_call`` → call → ``record_success`` / ``record_failure``."""

    backend: str
    settings: BreakerSettings = field(default_factory=BreakerSettings)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=self.settings.window_size)
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self._export()

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose cool-down has passed reports HALF_OPEN."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            return BreakerState.HALF_OPEN
        return self._state

    def before_call(self) -> None:
        """Let the call through, or raise :class:`CircuitOpen` without calling anything."""
        now = self.clock()
        if self._state is BreakerState.CLOSED:
            return
        if self._state is BreakerState.OPEN and self._cooled_down():
            self._set(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN:
            lease_expired = (
                self._probe_started is not None
                and now - self._probe_started >= self.settings.cool_down_seconds
            )
            if self._probe_started is None or lease_expired:
                self._probe_started = now
                return
        raise CircuitOpen(
            "circuit open: failing fast", backend=self.backend, retry_in_seconds=round(self._retry_in(now), 3)
        )

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._close()
            return
        if self._state is BreakerState.OPEN:
            return  # a late answer to a call made before the breaker opened
        self._consecutive = 0
        self._window.append(False)

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._open()
            return
        if self._state is BreakerState.OPEN:
            return
        self._consecutive += 1
        self._window.append(True)
        failures = sum(self._window)
        tripped_rate = (
            len(self._window) >= self.settings.min_calls
            and failures / len(self._window) >= self.settings.failure_rate
        )
        if self._consecutive >= self.settings.failure_threshold or tripped_rate:
            self._open()

    def abandon(self) -> None:
        """The call ended without an answer either way (e.g. cancelled): free the probe slot."""
        if self._state is BreakerState.HALF_OPEN:
            self._probe_started = None

    @asynccontextmanager
    async def guard(
        self, is_failure: Callable[[BaseException], bool] = is_upstream_failure
    ) -> AsyncIterator[None]:
        """``async with breaker.guard(): ...`` — any exception ``is_failure`` rejects counts as success."""
        self.before_call()
        try:
            yield
        except Exception as exc:
            if is_failure(exc):
                self.record_failure()
            else:
                self.record_success()
            raise
        except BaseException:
            self.abandon()
            raise
        self.record_success()

    def snapshot(self) -> BreakerSnapshot:
        now = self.clock()
        return BreakerSnapshot(
            backend=self.backend,
            state=self.state.name.lower(),
            consecutive_failures=self._consecutive,
            window_calls=len(self._window),
            window_failures=sum(self._window),
            retry_in_seconds=round(self._retry_in(now), 3),
        )

    def _retry_in(self, now: float) -> float:
        if self._state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.settings.cool_down_seconds - now)
        if self._state is BreakerState.HALF_OPEN and self._probe_started is not None:
            return max(0.0, self._probe_started + self.settings.cool_down_seconds - now)
        return 0.0

    def _cooled_down(self) -> bool:
        return self.clock() - self._opened_at >= self.settings.cool_down_seconds

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._probe_started = None
        self._consecutive = 0
        self._window.clear()
        self._set(BreakerState.OPEN)

    def _close(self) -> None:
        self._probe_started = None
        self._consecutive = 0
        self._window.clear()
        self._set(BreakerState.CLOSED)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        self._export()

    def _export(self) -> None:
        metrics.BREAKER_STATE.labels(self.backend).set(int(self._state))
