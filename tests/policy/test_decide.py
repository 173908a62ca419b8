"""`Decider`: every engine failure is a deny with its own code, a tool's required obligations are enforced,
the candidate (shadow) policy is recorded off the response path and never enforced, and visible tools
fail closed with a logged code."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from mcp_fhir import metrics
from mcp_fhir._exceptions import (
    PolicyError,
    PolicyMalformed,
    PolicyTimeout,
    PolicyUnavailable,
    PolicyUndefined,
)
from mcp_fhir.audit.fake import FakeAuditTrail
from mcp_fhir.policy.decide import Decider
from mcp_fhir.policy.engine import Decision, FakePolicyEngine, Obligations
from mcp_fhir.policy.input import DecisionInput
from tests.tools.conftest import SUBJECT, allow_with, deny_with

INPUT = DecisionInput(
    subject=SUBJECT,
    tool="search_observations",
    operation="search",
    resource_type="Observation",
    patient="pat-1",
    params={},
    purpose="treatment",
    break_glass_reason=None,
    backend="fake",
    request_id="req-1",
)


def make(engine: Any = None, *, shadow: Any = None, timeout: float = 5.0) -> tuple[Decider, FakeAuditTrail]:
    trail = FakeAuditTrail()
    active = engine if engine is not None else FakePolicyEngine(lambda _i: allow_with())
    return Decider(active, audit=trail.record, candidate=shadow, shadow_timeout=timeout), trail


class RaisingEngine:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision:
        raise self.exc

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]:
        raise self.exc


def _decisions(result: str, reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "mcp_fhir_decisions_total", {"result": result, "reason": reason}
    )
    return value or 0.0


def _divergences(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_shadow_divergences_total", {"kind": kind}) or 0.0


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (PolicyUnavailable("down"), "opa_unavailable"),
        (PolicyTimeout("slow"), "opa_timeout"),
        (PolicyUndefined("undefined"), "opa_undefined"),
        (PolicyMalformed("garbled"), "opa_malformed"),
        (PolicyError("other"), "policy_error"),
        (RuntimeError("a bug in the engine"), "opa_unavailable"),
        (KeyError("result"), "opa_unavailable"),
    ],
)
async def test_every_engine_exception_is_a_deny_with_its_code_and_is_counted(exc: Exception, code: str):
    decider, _ = make(RaisingEngine(exc))
    before = _decisions("deny", code)
    decision = await decider.decide(INPUT)
    assert (decision.allow, decision.reason_codes) == (False, (code,))
    assert decision.obligations == Obligations()
    assert _decisions("deny", code) == before + 1


async def test_a_policy_error_keeps_its_decision_id_on_the_deny():
    decider, _ = make(RaisingEngine(PolicyMalformed("garbled", decision_id="d-9")))
    decision = await decider.decide(INPUT)
    assert decision.decision_id == "d-9"


async def test_an_allow_is_counted_under_none_and_each_deny_reason_on_its_own():
    engine = FakePolicyEngine(lambda _i: allow_with())
    decider, _ = make(engine)
    before_allow = _decisions("allow", "none")
    await decider.decide(INPUT)
    assert _decisions("allow", "none") == before_allow + 1
    engine.answer_with(lambda _i: deny_with("NO_ROLE", "PURPOSE_REQUIRED"))
    before = (_decisions("deny", "NO_ROLE"), _decisions("deny", "PURPOSE_REQUIRED"))
    await decider.decide(INPUT)
    assert (_decisions("deny", "NO_ROLE"), _decisions("deny", "PURPOSE_REQUIRED")) == (
        before[0] + 1,
        before[1] + 1,
    )


async def test_an_allow_without_an_obligation_the_tool_requires_is_a_malformed_deny():
    decider, _ = make(FakePolicyEngine(lambda _i: allow_with(decision_id="d-7")))
    decision = await decider.decide(INPUT, requires=("audit_patients",))
    assert (decision.allow, decision.reason_codes, decision.decision_id) == (False, ("opa_malformed",), "d-7")


async def test_an_allow_with_the_required_obligation_stands_and_a_deny_needs_none():
    ob = Obligations(audit_patients=None, present=frozenset({"audit_patients"}))
    decider, _ = make(FakePolicyEngine(lambda _i: allow_with(ob)))
    assert (await decider.decide(INPUT, requires=("audit_patients",))).allow
    decider, _ = make(FakePolicyEngine(lambda _i: deny_with("NO_ROLE")))
    assert (await decider.decide(INPUT, requires=("audit_patients",))).reason_codes == ("NO_ROLE",)


NARROW = Obligations(max_results=5)


@pytest.mark.parametrize(
    ("active", "candidate", "kind"),
    [
        (deny_with("NO_ROLE"), allow_with(), "widening"),
        (allow_with(), deny_with("NO_ROLE"), "narrowing"),
        (allow_with(), allow_with(NARROW), "obligations"),
    ],
)
async def test_a_shadow_divergence_is_recorded_once_and_never_changes_the_active_decision(
    active: Decision, candidate: Decision, kind: str
):
    decider, trail = make(FakePolicyEngine(lambda _i: active), shadow=FakePolicyEngine(lambda _i: candidate))
    before = _divergences(kind)
    decision = await decider.decide(INPUT)
    await decider.wait_for_shadow()
    assert decision == active
    [record] = trail.records
    assert (record.kind, record.extra["divergence"], record.request_id, record.tool) == (
        "shadow_divergence",
        kind,
        "req-1",
        "search_observations",
    )
    assert record.result == ("allowed" if active.allow else "denied")
    assert record.extra["candidate"]["allow"] is candidate.allow
    assert _divergences(kind) == before + 1


class GatedEngine:
    """Answers only once `gate` is set; sets `started` when asked."""

    def __init__(self, decision: Decision, gate: asyncio.Event) -> None:
        self.decision, self.gate, self.started = decision, gate, asyncio.Event()

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision:
        self.started.set()
        await self.gate.wait()
        return self.decision

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]:
        return frozenset()


async def test_the_active_decision_never_waits_for_the_candidate():
    gate = asyncio.Event()
    candidate = GatedEngine(deny_with("NO_ROLE"), gate)
    decider, trail = make(shadow=candidate)
    decision = await asyncio.wait_for(decider.decide(INPUT), timeout=5)  # the candidate has not answered
    assert decision.allow
    await asyncio.wait_for(candidate.started.wait(), timeout=5)
    assert trail.records == []
    gate.set()
    await decider.wait_for_shadow()
    assert [r.extra["divergence"] for r in trail.records] == ["narrowing"]  # recorded when it arrives


async def test_a_candidate_slower_than_its_timeout_is_counted_and_audited_as_shadow_timeout():
    candidate = GatedEngine(allow_with(), asyncio.Event())  # never answers
    decider, trail = make(shadow=candidate, timeout=0.05)
    before = _divergences("shadow_timeout")
    decision = await decider.decide(INPUT)
    assert decision.allow
    await decider.wait_for_shadow()
    [record] = trail.records
    assert (record.kind, record.extra["divergence"], record.request_id) == (
        "shadow_divergence",
        "shadow_timeout",
        "req-1",
    )
    assert "candidate" not in record.extra
    assert _divergences("shadow_timeout") == before + 1


async def test_a_candidate_whose_own_client_times_out_is_a_shadow_timeout_too():
    decider, trail = make(shadow=RaisingEngine(PolicyTimeout("slow")))
    await decider.decide(INPUT)
    await decider.wait_for_shadow()
    assert [r.extra["divergence"] for r in trail.records] == ["shadow_timeout"]


async def test_an_agreeing_shadow_writes_nothing():
    decider, trail = make(
        FakePolicyEngine(lambda _i: allow_with()),
        shadow=FakePolicyEngine(lambda _i: allow_with(decision_id="other-id")),
    )
    await decider.decide(INPUT)
    await decider.wait_for_shadow()
    assert trail.records == []


@pytest.mark.parametrize("exc", [PolicyUnavailable("down"), RuntimeError("candidate bug")])
async def test_a_failing_shadow_is_a_candidate_deny_and_the_active_allow_stands(exc: Exception):
    decider, trail = make(shadow=RaisingEngine(exc))
    decision = await decider.decide(INPUT)
    await decider.wait_for_shadow()
    assert decision.allow
    assert [(r.kind, r.extra["divergence"]) for r in trail.records] == [("shadow_divergence", "narrowing")]


async def test_a_shadow_record_that_cannot_be_written_never_reaches_the_caller():
    decider, trail = make(shadow=FakePolicyEngine(lambda _i: deny_with("NO_ROLE")))
    trail.fail = True
    decision = await decider.decide(INPUT)
    await decider.wait_for_shadow()
    assert decision.allow


async def test_visible_tools_are_the_policys_answer():
    decider, _ = make(FakePolicyEngine(visible=frozenset({"read_patient", "not_enabled"})))
    assert await decider.visible_tools(SUBJECT, backend="fake") == frozenset({"read_patient", "not_enabled"})


@pytest.mark.parametrize(
    ("exc", "code"),
    [(PolicyUnavailable("detail-1"), "opa_unavailable"), (RuntimeError("detail-2"), "opa_unavailable")],
)
async def test_visible_tools_fail_closed_with_a_logged_code(
    exc: Exception, code: str, caplog: pytest.LogCaptureFixture
):
    decider, _ = make(RaisingEngine(exc))
    with caplog.at_level("WARNING", logger="mcp_fhir.decide"):
        assert await decider.visible_tools(SUBJECT, backend="fake") == frozenset()
    assert [getattr(r, "code", None) for r in caplog.records] == [code]
    assert "detail-" not in caplog.text  # the code and the exception type, never its message
