from __future__ import annotations

import asyncio

import httpx2
import pytest

from mcp_fhir import metrics
from mcp_fhir._exceptions import CircuitOpen, ConfigError, UpstreamRejected, UpstreamUnavailable
from mcp_fhir.resilience.breaker import BreakerSettings, BreakerState, CircuitBreaker
from tests.testbed.fault_proxy import EchoServer, Fault, FaultProxy


def _gauge(backend: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_circuit_state", {"backend": backend})


def _fail(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        breaker.before_call()
        breaker.record_failure()


def test_breaker_opens_after_consecutive_failures_and_fails_fast(clock):
    breaker = CircuitBreaker("b-consecutive", clock=clock)
    _fail(breaker, 4)
    assert breaker.state is BreakerState.CLOSED
    _fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    assert _gauge("b-consecutive") == 2
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.code == "upstream_circuit_open"


def test_a_success_resets_the_consecutive_count(clock):
    breaker = CircuitBreaker("b-reset", clock=clock)
    _fail(breaker, 4)
    breaker.before_call()
    breaker.record_success()
    _fail(breaker, 4)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_opens_on_failure_rate_over_the_window(clock):
    breaker = CircuitBreaker("b-rate", clock=clock)
    for i in range(10):  # success, failure, success, ... : never two failures in a row
        assert breaker.state is BreakerState.CLOSED
        breaker.before_call()
        if i % 2:
            breaker.record_failure()
        else:
            breaker.record_success()
    assert breaker.state is BreakerState.OPEN  # 5 of the last 10 calls failed


def test_failure_rate_needs_the_minimum_number_of_calls(clock):
    breaker = CircuitBreaker("b-min", BreakerSettings(failure_threshold=100), clock=clock)
    for _ in range(4):
        breaker.before_call()
        breaker.record_success()
    _fail(breaker, 4)  # 50 % but only 8 calls
    assert breaker.state is BreakerState.CLOSED
    _fail(breaker, 1)  # 9 calls, 5 failures: still under the minimum
    assert breaker.state is BreakerState.CLOSED
    _fail(breaker, 1)  # 10 calls, 6 failures
    assert breaker.state is BreakerState.OPEN


def test_half_opens_after_cool_down_letting_one_probe_through_and_recovers(clock):
    breaker = CircuitBreaker("b-half", clock=clock)
    _fail(breaker, 5)
    clock.advance(29.9)
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()  # the probe
    assert _gauge("b-half") == 1
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one probe at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert _gauge("b-half") == 0
    breaker.before_call()


def test_a_failed_probe_reopens_for_another_cool_down(clock):
    breaker = CircuitBreaker("b-reopen", clock=clock)
    _fail(breaker, 5)
    clock.advance(30)
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(29)
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(1)
    breaker.before_call()


def test_a_lost_probe_does_not_wedge_the_breaker(clock):
    breaker = CircuitBreaker("b-lost", clock=clock)
    _fail(breaker, 5)
    clock.advance(30)
    breaker.before_call()  # probe never reports back
    clock.advance(30)
    breaker.before_call()  # a new probe is allowed


async def test_guard_counts_only_upstream_failures(clock):
    breaker = CircuitBreaker("b-guard", clock=clock)
    for _ in range(10):
        with pytest.raises(UpstreamRejected):
            async with breaker.guard():
                raise UpstreamRejected("404")
    assert breaker.state is BreakerState.CLOSED
    for _ in range(5):
        with pytest.raises(UpstreamUnavailable):
            async with breaker.guard():
                raise UpstreamUnavailable("503")
    assert breaker.state is BreakerState.OPEN
    called = False
    with pytest.raises(CircuitOpen):
        async with breaker.guard():
            called = True
    assert not called


async def test_a_cancelled_probe_frees_the_probe_slot(clock):
    breaker = CircuitBreaker("b-cancel", clock=clock)
    _fail(breaker, 5)
    clock.advance(30)
    with pytest.raises(asyncio.CancelledError):
        async with breaker.guard():
            raise asyncio.CancelledError
    async with breaker.guard():
        pass
    assert breaker.state is BreakerState.CLOSED


def test_snapshot_reports_state_for_health(clock):
    failing, healthy = CircuitBreaker("b-snap", clock=clock), CircuitBreaker("b-other", clock=clock)
    _fail(failing, 5)
    assert failing.snapshot().state == "open"
    assert failing.snapshot().retry_in_seconds == 30.0
    assert healthy.snapshot().state == "closed"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"failure_threshold": 0}, "breaker.failure_threshold"),
        ({"window_size": 0}, "breaker.window_size"),
        ({"min_calls": 30}, "breaker.min_calls"),
        ({"failure_rate": 1.5}, "breaker.failure_rate"),
        ({"cool_down_seconds": 0}, "breaker.cool_down_seconds"),
        ({"cool_down_seconds": float("inf")}, "breaker.cool_down_seconds"),
    ],
)
def test_invalid_breaker_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        BreakerSettings(**kwargs)
    assert info.value.key == key


async def test_breaker_opens_on_real_500s_through_the_fault_proxy_and_recovers_after_clear(clock):
    breaker = CircuitBreaker("b-proxy", clock=clock)

    async def call(client: httpx2.AsyncClient) -> int:
        async with breaker.guard():
            response = await client.get("/fhir/Patient/1")
            if response.status_code >= 500:
                raise UpstreamUnavailable("upstream 5xx", status=response.status_code)
            return response.status_code

    with EchoServer() as upstream, FaultProxy(upstream=upstream.url) as proxy:
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=5.0) as client:
            proxy.set_fault(Fault.status(500))
            for _ in range(5):
                with pytest.raises(UpstreamUnavailable):
                    await call(client)
            assert breaker.state is BreakerState.OPEN
            seen = proxy.requests_seen
            with pytest.raises(CircuitOpen):
                await call(client)
            assert proxy.requests_seen == seen  # failed fast: nothing was sent

            proxy.clear()
            clock.advance(30)
            assert await call(client) == 200
            assert breaker.state is BreakerState.CLOSED
            assert proxy.requests_forwarded == 1
