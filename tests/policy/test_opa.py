"""`OpaPolicyEngine` against a real OPA: real decisions parse, and through the fault proxy every failure is
one typed deny code, with no retry (the proxy sees exactly one request per decision)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mcp_fhir._exceptions import PolicyError
from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings
from tests.testbed.fault_proxy import Fault, FaultProxy
from tests.testbed.sidecar import POLICIES

pytestmark = pytest.mark.integration

DECISION_TIMEOUT_S = 0.3
CORPUS = POLICIES / "fixtures" / "decisions.json"


def _case(allow: bool) -> dict[str, Any]:
    cases = json.loads(CORPUS.read_text(encoding="utf-8"))
    return next(c for c in cases if c["expect"]["allow"] is allow and isinstance(c["input"], dict))


@pytest.fixture(scope="module")
async def opa(opa_binary: str) -> AsyncIterator[ManagedOpa]:
    async with ManagedOpa([POLICIES], binary=opa_binary) as managed:
        yield managed


@pytest.fixture(scope="module")
async def proxy(opa: ManagedOpa) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream=opa.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
async def proxied(proxy: FaultProxy) -> AsyncIterator[OpaPolicyEngine]:
    proxy.clear()
    async with OpaPolicyEngine(OpaSettings(url=proxy.url, decision_timeout=DECISION_TIMEOUT_S)) as engine:
        yield engine
    proxy.clear()


async def test_a_real_allow_parses_with_its_obligations(opa: ManagedOpa):
    case = _case(allow=True)
    async with OpaPolicyEngine(OpaSettings(url=opa.url)) as engine:
        decision = await engine.evaluate(case["input"])
    assert decision.allow is True
    assert decision.obligations.to_dict() == case["expect"]["obligations"]


async def test_a_real_deny_parses_with_its_reason_codes(opa: ManagedOpa):
    case = _case(allow=False)
    async with OpaPolicyEngine(OpaSettings(url=opa.url)) as engine:
        decision = await engine.evaluate(case["input"])
    assert decision.allow is False
    assert list(decision.reason_codes) == sorted(case["expect"]["reasons"])


async def test_real_visible_tools_are_a_set_of_tool_names(opa: ManagedOpa):
    subject = _case(allow=True)["input"]["subject"]
    async with OpaPolicyEngine(OpaSettings(url=opa.url)) as engine:
        visible = await engine.visible_tools({"subject": subject})
    assert "search_observations" in visible


async def test_a_decision_through_the_proxy_is_one_request(proxied: OpaPolicyEngine, proxy: FaultProxy):
    before = proxy.requests_seen
    decision = await proxied.evaluate(_case(allow=True)["input"])
    assert decision.allow is True
    assert proxy.requests_seen - before == 1


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        pytest.param(Fault.latency(DECISION_TIMEOUT_S * 4), "opa_timeout", id="slow"),
        pytest.param(Fault.garbage(), "opa_malformed", id="garbage"),
        pytest.param(Fault.json({}), "opa_undefined", id="undefined"),
        pytest.param(Fault.json({"result": {"allow": "yes"}}), "opa_malformed", id="off contract"),
        pytest.param(Fault.status(500), "opa_unavailable", id="http 500"),
        pytest.param(Fault.status(503), "opa_unavailable", id="http 503"),
        pytest.param(Fault.reset(), "opa_unavailable", id="reset"),
    ],
)
async def test_each_opa_failure_is_one_typed_error_after_exactly_one_request(
    proxied: OpaPolicyEngine, proxy: FaultProxy, fault: Fault, code: str
):
    proxy.set_fault(fault)
    before = proxy.requests_seen
    with pytest.raises(PolicyError) as caught:
        await proxied.evaluate(_case(allow=True)["input"])
    assert caught.value.code == code
    assert proxy.requests_seen - before == 1


async def test_opa_down_is_unavailable_without_a_retry(proxied: OpaPolicyEngine, proxy: FaultProxy):
    proxy.set_fault(Fault.down())
    before = proxy.connections_accepted
    with pytest.raises(PolicyError) as caught:
        await proxied.evaluate(_case(allow=True)["input"])
    assert caught.value.code == "opa_unavailable"
    assert proxy.connections_accepted == before


async def test_the_engine_recovers_once_opa_answers_again(proxied: OpaPolicyEngine, proxy: FaultProxy):
    proxy.set_fault(Fault.status(500), times=1)
    with pytest.raises(PolicyError):
        await proxied.evaluate(_case(allow=True)["input"])
    assert (await proxied.evaluate(_case(allow=True)["input"])).allow is True


async def test_health_is_false_when_opa_is_down(proxied: OpaPolicyEngine, proxy: FaultProxy):
    assert await proxied.healthy()
    proxy.set_fault(Fault.down())
    assert not await proxied.healthy()
