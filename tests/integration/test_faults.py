"""Issue #7, what it must show, through the FULL sidecar: `build_server(settings)` driven by the official
MCP client, with a `FaultProxy` between the sidecar and each real dependency (OPA, the FHIR test bed,
the SMART token endpoint's token-checking FHIR proxy).

* OPA down, slow, garbage, undefined or a non-boolean allow: every call denies with its own code and
  the EHR sees ZERO requests.
* FHIR 5xx and timeouts: the breaker opens after its threshold, fails fast while open (no upstream
  request), and closes again after the (short, configured) cool-down.
* 429 with Retry-After: retried after the hint; a hint past the retry deadline fails at once, and the
  backend stays penalised (the limit holds: no request reaches the EHR until it has passed).
* Retry-After (issue #19) on a 503 and a 429 alike, as seconds or an HTTP-date, capped by the
  backend's ``max_retry_after``: no request reaches the EHR before it expires, neither from the call
  that got it nor from any other call to that backend (with no rate limit configured), nor from a
  second replica sharing the limiter's Redis.
* An expired SMART token: exactly one refresh, then success.
* A truncated body: a clear `upstream_*` error, never partial data.

Every timeout here is named and finite.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.backends import breaker_snapshot, held_for
from mcp_fhir.context import AppContext
from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.server import build_server
from tests.adversarial.conftest import attempt, audit_records, tool_error
from tests.testbed import data
from tests.testbed.fault_proxy import Fault, FaultProxy
from tests.testbed.sidecar import CLINICIAN, POLICIES, sidecar_config
from tests.testbed.token_server import RegisteredClient, start_token_server

pytestmark = pytest.mark.integration

DECISION_TIMEOUT = 0.5  # the sidecar's default opa.decision_timeout, set explicitly in running()
OPA_SLOW = 1.5  # > DECISION_TIMEOUT
FHIR_READ_TIMEOUT = 0.5
FHIR_SLOW = 2.0  # > FHIR_READ_TIMEOUT
BREAKER = {"failure_threshold": 3, "cool_down_seconds": 1.0}
RECOVERY_DEADLINE = 10.0
POLL_INTERVAL = 0.05
CLOCK_SLACK = 0.01  # wall and monotonic clocks read a moment apart
RETRY_AFTER = 1
RETRY_AFTER_TOO_LONG = 60  # beyond the retry deadline (resilience.retry.DEFAULT_DEADLINE_S)
SMART_SECRET_ENV = "ADV_FAULTS_SMART_SECRET"
SMART_SECRET = "fault-suite-secret-not-real"
ARGS = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}


@dataclass
class Running:
    client: Client
    app: AppContext
    workdir: Path


@asynccontextmanager
async def running(
    workdir: Path, fhir_base: str, opa: str, *, client_kw: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    overrides = {"opa": {"decision_timeout": DECISION_TIMEOUT}, **overrides}
    settings = config.from_mapping(
        sidecar_config(workdir, fhir_base, opa_url=opa, identity=CLINICIAN, **overrides)
    )
    server = build_server(settings)
    async with Client(server, **(client_kw or {})) as client:
        yield Running(client, server.app_holder["app"], workdir)  # type: ignore[attr-defined]


async def wait_until(predicate: Callable[[], Awaitable[bool]], deadline: float) -> None:
    """Poll a real condition until it holds, failing the test at the deadline."""
    end = time.monotonic() + deadline
    while not await predicate():
        if time.monotonic() > end:
            pytest.fail("condition not met before the deadline")
        await asyncio.sleep(POLL_INTERVAL)


@pytest.fixture(scope="module")
async def opa(opa_binary: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ManagedOpa]:
    managed = ManagedOpa([POLICIES], binary=opa_binary, decision_log=tmp_path_factory.mktemp("opa") / "d.log")
    await managed.start()
    try:
        yield managed
    finally:
        await managed.stop()


@asynccontextmanager
async def fhir_proxy(fhir_server: Any) -> AsyncIterator[tuple[FaultProxy, str]]:
    async with FaultProxy(fhir_server.base_url.split("/fhir")[0]) as proxy:
        yield proxy, proxy.url + urlsplit(fhir_server.base_url).path


OPA_FAULTS = {
    "down": (Fault.down(), "opa_unavailable"),
    "slow": (Fault.latency(OPA_SLOW), "opa_timeout"),
    "garbage": (Fault.garbage(), "opa_malformed"),
    "undefined": (Fault.json({}), "opa_undefined"),
    "non-boolean allow": (Fault.json({"result": {"allow": "yes"}}), "opa_malformed"),
    "a 500": (Fault.status(500), "opa_unavailable"),
}


@pytest.mark.parametrize("name", list(OPA_FAULTS))
async def test_an_opa_fault_denies_with_its_own_code_and_makes_no_ehr_request(
    name: str, tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    fault, code = OPA_FAULTS[name]
    async with fhir_proxy(fhir_server) as (fhir, base), FaultProxy(opa.url) as opa_proxy:
        async with running(tmp_path, base, opa_proxy.url, cache={"enabled": False}) as sc:
            before = fhir.requests_seen
            opa_proxy.set_fault(fault)
            results = [
                await attempt(sc.client, tool, ARGS) for tool in ("read_patient", "search_observations")
            ]
            seen = fhir.requests_seen - before
            opa_proxy.clear()
    for result in results:
        err = tool_error(result)
        assert err["code"] == "policy_denied" and err["reasons"] == [code]
    assert seen == 0
    records = audit_records(tmp_path)
    assert [r["result"] for r in records] == ["denied", "denied"]
    assert all(r["reason_codes"] == [code] for r in records)


async def test_fhir_5xx_opens_the_breaker_which_fails_fast_and_recovers_after_the_cool_down(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(
            tmp_path,
            base,
            opa.url,
            cache={"enabled": False},
            backends={"testbed": {"base_url": base, "breaker": BREAKER}},
        ) as sc:
            fhir.set_fault(Fault.status(503))
            first = await attempt(sc.client, "read_patient", ARGS)
            assert breaker_snapshot(sc.app.backends)["testbed"] == "open"
            seen_when_open = fhir.requests_seen
            fast = await attempt(sc.client, "read_patient", ARGS)
            assert fhir.requests_seen == seen_when_open  # fail fast: nothing reached the EHR
            fhir.clear()

            async def recovered() -> bool:
                result = await attempt(sc.client, "read_patient", ARGS)
                return not isinstance(result, Exception) and not result.is_error

            await wait_until(recovered, RECOVERY_DEADLINE)
            state = breaker_snapshot(sc.app.backends)["testbed"]
    assert tool_error(first)["code"] in ("upstream_unavailable", "upstream_circuit_open")
    assert tool_error(fast)["code"] == "upstream_circuit_open"
    assert state == "closed"
    results = [r["result"] for r in audit_records(tmp_path)]
    assert results[:2] == ["error", "error"] and results[-1] == "allowed"


async def test_fhir_timeouts_open_the_breaker_too(tmp_path: Path, fhir_server: Any, opa: ManagedOpa) -> None:
    backend = {"base_url": "", "breaker": BREAKER, "read_timeout": FHIR_READ_TIMEOUT}
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(
            tmp_path,
            base,
            opa.url,
            cache={"enabled": False},
            backends={"testbed": {**backend, "base_url": base}},
        ) as sc:
            fhir.set_fault(Fault.latency(FHIR_SLOW))
            first = await attempt(sc.client, "read_patient", ARGS)
            state = breaker_snapshot(sc.app.backends)["testbed"]
            seen = fhir.requests_seen
            fast = await attempt(sc.client, "read_patient", ARGS)
            assert fhir.requests_seen == seen
            fhir.clear()
    assert tool_error(first)["code"] in ("upstream_timeout", "upstream_unavailable", "upstream_circuit_open")
    assert state == "open"
    assert tool_error(fast)["code"] == "upstream_circuit_open"


async def test_a_429_with_retry_after_is_retried_after_the_hint(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        backend = {"base_url": base, "rate_limit_per_minute": 600}
        async with running(
            tmp_path, base, opa.url, cache={"enabled": False}, backends={"testbed": backend}
        ) as sc:
            before = fhir.requests_seen
            fhir.set_fault(Fault.status(429, headers={"Retry-After": str(RETRY_AFTER)}), times=1)
            started = time.monotonic()
            result = await attempt(sc.client, "read_patient", ARGS)
            elapsed = time.monotonic() - started
            seen = fhir.requests_seen - before
    assert not result.is_error, result.content[0].text
    assert elapsed >= RETRY_AFTER * 0.95
    assert seen == 2


async def test_a_retry_after_past_the_deadline_fails_at_once_and_the_limit_holds(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        backend = {"base_url": base, "rate_limit_per_minute": 600}
        async with running(
            tmp_path, base, opa.url, cache={"enabled": False}, backends={"testbed": backend}
        ) as sc:
            before = fhir.requests_seen
            fhir.set_fault(Fault.status(429, headers={"Retry-After": str(RETRY_AFTER_TOO_LONG)}), times=1)
            started = time.monotonic()
            first = await attempt(sc.client, "read_patient", ARGS)
            second = await attempt(sc.client, "read_patient", ARGS)
            elapsed = time.monotonic() - started
            seen = fhir.requests_seen - before
    assert tool_error(first)["code"] == "upstream_rate_limited"
    assert tool_error(second)["code"] == "upstream_rate_limited"
    assert seen == 1  # the penalty holds: the second call never reached the EHR
    assert elapsed < RETRY_AFTER_TOO_LONG / 2


async def test_an_expired_ehr_token_is_refreshed_once_and_the_call_succeeds(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMART_SECRET_ENV, SMART_SECRET)
    with start_token_server(
        [RegisteredClient("sidecar", secret=SMART_SECRET)], upstream_fhir_url=fhir_server.base_url
    ) as tokens:
        backend = {
            "base_url": tokens.fhir_base_url,
            "smart": {
                "client_id": "sidecar",
                "auth_method": "client_secret_basic",
                "token_url": tokens.token_url,
                "client_secret_env": SMART_SECRET_ENV,
            },
        }
        async with running(
            tmp_path, tokens.fhir_base_url, opa.url, cache={"enabled": False}, backends={"testbed": backend}
        ) as sc:
            first = await attempt(sc.client, "read_patient", ARGS)
            issued_before = tokens.token_requests
            for token in tokens.issued_tokens():
                tokens.expire(token)
            second = await attempt(sc.client, "read_patient", ARGS)
            issued_after = tokens.token_requests
    assert not first.is_error and not second.is_error, second
    assert issued_after - issued_before == 1
    assert second.structured_content["resources"][0]["id"] == data.AU_PATIENT_ID


async def test_a_truncated_body_is_a_clear_error_never_partial_data(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        backend = {"base_url": base, "breaker": {"failure_threshold": 20}}  # keep the breaker out of it
        async with running(
            tmp_path, base, opa.url, cache={"enabled": False}, backends={"testbed": backend}
        ) as sc:
            fhir.set_fault(Fault.truncate(bytes=40))
            search = await attempt(sc.client, "search_observations", ARGS)
            read = await attempt(sc.client, "read_patient", ARGS)
            fhir.clear()
    for result in (search, read):
        assert isinstance(result, Exception), "a truncated body must never produce a result"
        assert tool_error(result)["code"] in ("upstream_unavailable", "upstream_bad_response")
    records = audit_records(tmp_path)
    assert [r["result"] for r in records] == ["error", "error"]
    assert all(r["returned_count"] is None for r in records)


# --- Issue #19: Retry-After on every status that carries it, held for the whole backend ---------------

HINT = 2  # seconds: a Retry-After long enough to tell apart from a backoff (0.1-0.2 s)
MAX_RETRY_AFTER = 1.0
CALLS_DURING_HOLD = 2
REDIS_ENV = "MCP_FHIR_TEST_REDIS_URL"


def _after(times: list[float], start: int) -> list[float]:
    return times[start:]


@pytest.mark.parametrize("status", [503, 429])
async def test_retry_after_in_seconds_is_honoured_on_a_503_and_a_429_alike(
    status: int, tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(tmp_path, base, opa.url, cache={"enabled": False}) as sc:
            start = len(fhir.request_times)
            fhir.set_fault(Fault.status(status, headers={"Retry-After": str(HINT)}), times=1)
            result = await attempt(sc.client, "read_patient", ARGS)
            times = _after(fhir.request_times, start)
    assert not result.is_error, result.content[0].text
    assert len(times) == 2
    assert times[1] - times[0] >= HINT  # never a request before the hint expires


async def test_retry_after_as_an_http_date_is_honoured_to_the_second(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(tmp_path, base, opa.url, cache={"enabled": False}) as sc:
            start = len(fhir.request_times)
            wall, mono = time.time(), time.monotonic()
            expiry_wall = int(wall) + HINT + 1  # HTTP dates have whole seconds
            expiry = mono + (expiry_wall - wall)
            header = email.utils.formatdate(expiry_wall, usegmt=True)
            fhir.set_fault(Fault.status(503, headers={"Retry-After": header}), times=1)
            result = await attempt(sc.client, "read_patient", ARGS)
            times = _after(fhir.request_times, start)
    assert not result.is_error, result.content[0].text
    assert len(times) == 2
    assert times[1] >= expiry - CLOCK_SLACK


async def test_a_retry_after_beyond_the_configured_maximum_is_capped(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        backend = {"base_url": base, "max_retry_after": MAX_RETRY_AFTER}
        async with running(
            tmp_path, base, opa.url, cache={"enabled": False}, backends={"testbed": backend}
        ) as sc:
            start = len(fhir.request_times)
            fhir.set_fault(Fault.status(503, headers={"Retry-After": str(RETRY_AFTER_TOO_LONG)}), times=1)
            result = await attempt(sc.client, "read_patient", ARGS)
            times = _after(fhir.request_times, start)
    assert not result.is_error, result.content[0].text
    assert len(times) == 2
    assert MAX_RETRY_AFTER <= times[1] - times[0] < RETRY_AFTER_TOO_LONG / 2


async def _held(sc: Running) -> bool:
    return (await held_for(sc.app.backends))["testbed"] > 0


async def test_one_429_holds_every_call_to_a_backend_without_a_rate_limit(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(tmp_path, base, opa.url, cache={"enabled": False}) as sc:  # generic r4: no limit
            start = len(fhir.request_times)
            fhir.set_fault(Fault.status(429, headers={"Retry-After": str(HINT)}), times=1)
            first = asyncio.create_task(attempt(sc.client, "read_patient", ARGS))
            await wait_until(lambda: _held(sc), RECOVERY_DEADLINE)
            others = await asyncio.gather(
                *(attempt(sc.client, "read_patient", ARGS) for _ in range(CALLS_DURING_HOLD))
            )
            results = [await first, *others]
            times = _after(fhir.request_times, start)
    assert all(not r.is_error for r in results), [r.content[0].text for r in results if r.is_error]
    assert len(times) == 1 + len(results)
    assert all(t - times[0] >= HINT for t in times[1:])  # no call reached the EHR within the window


@pytest.fixture
def redis_env() -> dict[str, str]:
    url = os.environ.get(REDIS_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{REDIS_ENV} is not set but CI is: start the services with scripts/services.sh")
        pytest.skip(f'{REDIS_ENV} is not set (eval "$(scripts/services.sh start)")')
    return {REDIS_ENV: url}


@pytest.mark.redis
async def test_a_429_seen_by_one_replica_holds_the_backend_for_a_replica_sharing_its_redis(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa, redis_env: dict[str, str]
) -> None:
    shared = {"store": "redis", "redis_url_env": REDIS_ENV, "redis_key_prefix": f"faults:{uuid.uuid4().hex}:"}
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with (
            running(tmp_path / "a", base, opa.url, cache={"enabled": False}, rate_limit=shared) as a,
            running(tmp_path / "b", base, opa.url, cache={"enabled": False}, rate_limit=shared) as b,
        ):
            start = len(fhir.request_times)
            fhir.set_fault(Fault.status(429, headers={"Retry-After": str(HINT)}), times=1)
            first = asyncio.create_task(attempt(a.client, "read_patient", ARGS))
            await wait_until(lambda: _held(b), RECOVERY_DEADLINE)
            other = await attempt(b.client, "read_patient", ARGS)
            results = [await first, other]
            times = _after(fhir.request_times, start)
    assert all(not r.is_error for r in results)
    assert len(times) == 3
    assert all(t - times[0] >= HINT for t in times[1:])


# --- Issue #19 §3: a total deadline on every upstream request, proven with a trickling sender --------

TRICKLE = Fault.trickle(every=0.5, bytes=1)  # every read answers within 0.5 s; the body takes minutes
TRICKLE_READ_TIMEOUT = 1.0  # > the trickle's interval: an idle-socket timeout never fires
TOTAL_DEADLINE = 2.0
MAX_BACKOFF = 0.3  # the retry loop's jittered backoff before attempts 2 and 3 (0.1 + 0.2 at most)
SLACK = 1.0  # scheduling on a shared 2-core machine


async def test_an_ehr_body_trickled_past_the_total_deadline_fails_with_upstream_timeout(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    backend = {"read_timeout": TRICKLE_READ_TIMEOUT, "total_timeout": TOTAL_DEADLINE}
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(
            tmp_path,
            base,
            opa.url,
            cache={"enabled": False},
            backends={"testbed": {**backend, "base_url": base, "breaker": {"failure_threshold": 20}}},
        ) as sc:
            start = len(fhir.request_times)
            fhir.set_fault(TRICKLE)
            began = time.monotonic()
            result = await attempt(sc.client, "read_patient", ARGS)
            elapsed = time.monotonic() - began
            attempts = len(fhir.request_times) - start
            fhir.clear()
    assert tool_error(result)["code"] == "upstream_timeout"
    assert 1 <= attempts <= 3  # reads are retried; each attempt is cut at the deadline
    assert elapsed <= attempts * TOTAL_DEADLINE + MAX_BACKOFF + SLACK
    records = audit_records(tmp_path)
    assert [r["result"] for r in records] == ["error"]


async def test_a_token_endpoint_trickling_its_answer_fails_with_upstream_timeout_within_the_deadline(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMART_SECRET_ENV, SMART_SECRET)
    with start_token_server(
        [RegisteredClient("sidecar", secret=SMART_SECRET)], upstream_fhir_url=fhir_server.base_url
    ) as tokens:
        async with FaultProxy(tokens.base_url) as token_proxy:
            backend = {
                "base_url": tokens.fhir_base_url,
                "breaker": {"failure_threshold": 20},
                "smart": {
                    "client_id": "sidecar",
                    "auth_method": "client_secret_basic",
                    "token_url": token_proxy.url + urlsplit(tokens.token_url).path,
                    "client_secret_env": SMART_SECRET_ENV,
                    "token_timeout": TOTAL_DEADLINE,  # > the trickle's interval, so only the total fires
                },
            }
            async with running(
                tmp_path,
                tokens.fhir_base_url,
                opa.url,
                cache={"enabled": False},
                backends={"testbed": backend},
            ) as sc:
                for token in tokens.issued_tokens():
                    tokens.expire(token)  # the next EHR call gets a 401 and needs a fresh token
                start = token_proxy.requests_seen
                token_proxy.set_fault(TRICKLE)
                began = time.monotonic()
                result = await attempt(sc.client, "read_patient", ARGS)
                elapsed = time.monotonic() - began
                attempts = token_proxy.requests_seen - start
                token_proxy.clear()
    assert tool_error(result)["code"] == "upstream_timeout"
    assert 1 <= attempts <= 3
    assert elapsed <= attempts * TOTAL_DEADLINE + MAX_BACKOFF + SLACK


async def test_an_opa_answer_trickled_past_the_decision_timeout_denies_with_opa_timeout_in_time(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base), FaultProxy(opa.url) as opa_proxy:
        async with running(tmp_path, base, opa_proxy.url, cache={"enabled": False}) as sc:
            before = fhir.requests_seen
            opa_proxy.set_fault(TRICKLE)
            began = time.monotonic()
            result = await attempt(sc.client, "read_patient", ARGS)
            elapsed = time.monotonic() - began
            seen = fhir.requests_seen - before
            opa_proxy.clear()
    err = tool_error(result)
    assert err["code"] == "policy_denied" and err["reasons"] == ["opa_timeout"]
    assert elapsed <= DECISION_TIMEOUT + SLACK  # OPA's deadline is the whole decision, body included
    assert seen == 0


async def test_a_token_endpoint_503_with_retry_after_is_not_asked_again_before_it_expires(
    tmp_path: Path, fhir_server: Any, opa: ManagedOpa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SMART_SECRET_ENV, SMART_SECRET)
    with start_token_server(
        [RegisteredClient("sidecar", secret=SMART_SECRET)], upstream_fhir_url=fhir_server.base_url
    ) as tokens:
        async with FaultProxy(tokens.base_url) as token_proxy:
            backend = {
                "base_url": tokens.fhir_base_url,
                "smart": {
                    "client_id": "sidecar",
                    "auth_method": "client_secret_basic",
                    "token_url": token_proxy.url + urlsplit(tokens.token_url).path,
                    "client_secret_env": SMART_SECRET_ENV,
                },
            }
            async with running(
                tmp_path,
                tokens.fhir_base_url,
                opa.url,
                cache={"enabled": False},
                backends={"testbed": backend},
            ) as sc:
                for token in tokens.issued_tokens():
                    tokens.expire(token)
                start = len(token_proxy.request_times)
                token_proxy.set_fault(Fault.status(503, headers={"Retry-After": str(HINT)}), times=1)
                refused = await attempt(sc.client, "read_patient", ARGS)
                held = await attempt(sc.client, "read_patient", ARGS)
                asked_while_held = len(token_proxy.request_times) - start

                async def recovered() -> bool:
                    result = await attempt(sc.client, "read_patient", ARGS)
                    return not isinstance(result, Exception) and not result.is_error

                await wait_until(recovered, RECOVERY_DEADLINE)
                times = _after(token_proxy.request_times, start)
    assert tool_error(refused)["code"] == "upstream_auth_failed"
    assert tool_error(held)["code"] == "upstream_auth_failed" and tool_error(held)["reason"] == "held"
    assert asked_while_held == 1  # the held call sent the token endpoint nothing
    assert len(times) == 2
    assert times[1] - times[0] >= HINT
