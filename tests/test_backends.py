"""`BackendGuard`: rate limit, then breaker, then the request; reads retried on outages and the EHR's 429,
never on our own breaker or limiter saying no; writes never retried."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mcp_fhir._exceptions import (
    CircuitOpen,
    MCPFhirError,
    ResourceNotFound,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcp_fhir.backends import breaker_for
from mcp_fhir.resilience.guard import BackendGuard


class Events(list[str]):
    pass


class FakeLimiter:
    def __init__(self, events: Events, *, reject: bool = False) -> None:
        self.events = events
        self.reject = reject
        self.penalties: list[float] = []

    async def acquire(self, backend: str) -> float:
        self.events.append("limit")
        if self.reject:
            raise UpstreamRateLimited("our own limit", backend=backend)
        return 0.0

    async def penalise(self, backend: str, wait: float) -> None:
        self.penalties.append(wait)


class FakeBreaker:
    def __init__(self, events: Events, *, open_: bool = False) -> None:
        self.events = events
        self.open = open_

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        self.events.append("breaker")
        if self.open:
            raise CircuitOpen("open")
        yield


class Upstream:
    """Fails with each error in turn, then answers 'ok'."""

    def __init__(self, events: Events, *errors: MCPFhirError) -> None:
        self.events = events
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        self.events.append("call")
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _rate_limited(retry_after: str | None) -> UpstreamRateLimited:
    err = UpstreamRateLimited("429", status=429)
    err.retry_after = retry_after
    return err


def _guard(
    *, limiter: bool = True, reject: bool = False, open_: bool = False
) -> tuple[BackendGuard, Events, Any]:
    events = Events()
    lim = FakeLimiter(events, reject=reject) if limiter else None
    guard = BackendGuard("ehr", limiter=lim, breaker=FakeBreaker(events, open_=open_))  # type: ignore[arg-type]
    return guard, events, lim


async def test_the_limiter_runs_before_the_breaker_and_the_breaker_before_the_request():
    guard, events, _ = _guard()
    assert await guard.run(Upstream(events), idempotent=True) == "ok"
    assert events == ["limit", "breaker", "call"]


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable("503", status=503),
        UpstreamTimeout("slow"),
        UpstreamUnavailable("connection reset"),
    ],
    ids=["5xx", "timeout", "transport"],
)
async def test_a_read_is_retried_on_an_outage_each_attempt_through_limiter_and_breaker(error: MCPFhirError):
    guard, events, _ = _guard()
    upstream = Upstream(events, error)
    assert await guard.run(upstream, idempotent=True) == "ok"
    assert upstream.calls == 2
    assert events == ["limit", "breaker", "call"] * 2


async def test_a_read_is_retried_after_the_ehrs_429_and_the_limiter_is_penalised_by_its_retry_after():
    guard, events, limiter = _guard()
    error = _rate_limited("0")
    upstream = Upstream(events, error)
    assert await guard.run(upstream, idempotent=True) == "ok"
    assert upstream.calls == 2
    assert limiter.penalties == [0.0]
    assert error.retry_after == 0.0  # the parsed wait, honoured by the retry loop


async def test_a_429_is_retried_without_a_limiter_too():
    guard, events, _ = _guard(limiter=False)
    upstream = Upstream(events, _rate_limited("0"))
    assert await guard.run(upstream, idempotent=True) == "ok"
    assert upstream.calls == 2


async def test_the_ehrs_retry_after_is_parsed_into_seconds_even_without_a_limiter():
    guard, events, _ = _guard(limiter=False)
    error = _rate_limited("0")
    assert await guard.run(Upstream(events, error), idempotent=True) == "ok"
    assert error.retry_after == 0.0  # seconds the retry loop honours, not the header's text


async def test_an_open_circuit_is_never_retried_and_the_request_is_never_sent():
    guard, events, _ = _guard(open_=True)
    upstream = Upstream(events)
    with pytest.raises(CircuitOpen) as caught:
        await guard.run(upstream, idempotent=True)
    assert caught.value.code == "upstream_circuit_open"
    assert upstream.calls == 0 and events == ["limit", "breaker"]


async def test_our_own_limiters_rejection_is_never_retried():
    guard, events, _ = _guard(reject=True)
    upstream = Upstream(events)
    with pytest.raises(UpstreamRateLimited) as caught:
        await guard.run(upstream, idempotent=True)
    assert caught.value.code == "upstream_rate_limited"
    assert upstream.calls == 0 and events == ["limit"]


@pytest.mark.parametrize(
    "error",
    [UpstreamRejected("400", status=400), ResourceNotFound("404", status=404)],
    ids=["rejected", "not found"],
)
async def test_a_refusal_by_the_ehr_is_not_retried(error: MCPFhirError):
    guard, events, _ = _guard()
    upstream = Upstream(events, error)
    with pytest.raises(type(error)):
        await guard.run(upstream, idempotent=True)
    assert upstream.calls == 1


@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailable("503", status=503), UpstreamTimeout("slow"), _rate_limited("0")],
    ids=["5xx", "timeout", "429"],
)
async def test_a_write_is_never_retried(error: MCPFhirError):
    guard, events, _ = _guard()
    upstream = Upstream(events, error)
    with pytest.raises(type(error)):
        await guard.run(upstream, idempotent=False)
    assert upstream.calls == 1
    assert events == ["limit", "breaker", "call"]


async def test_a_read_that_keeps_failing_gives_up_with_the_last_error():
    guard, events, _ = _guard()
    upstream = Upstream(events, *(UpstreamUnavailable("503", status=503) for _ in range(10)))
    with pytest.raises(UpstreamUnavailable):
        await guard.run(upstream, idempotent=True)
    assert 1 < upstream.calls < 10


def test_an_unknown_breaker_key_is_a_config_error_naming_it():
    from mcp_fhir._exceptions import ConfigError

    with pytest.raises(ConfigError) as caught:
        breaker_for("ehr", {"no_such_key": 1})
    assert caught.value.key == "backends.ehr.breaker.no_such_key"
