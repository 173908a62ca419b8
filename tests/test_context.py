"""`AppContext`: every engine failure is a deny with its own code, shadow divergences are recorded and
never enforced, and the visible tools are the policy's answer ∩ enabled minus unavailable."""

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
from mcp_fhir.policy.engine import Decision, FakePolicyEngine, Obligations
from mcp_fhir.policy.input import decision_input
from tests.tools.conftest import SUBJECT, allow_with, deny_with, make_harness

INPUT = decision_input(
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
    h = make_harness(engine=RaisingEngine(exc))
    before = _decisions("deny", code)
    decision = await h.app.decide(INPUT)
    assert (decision.allow, decision.reason_codes) == (False, (code,))
    assert decision.obligations == Obligations()
    assert _decisions("deny", code) == before + 1


async def test_a_policy_error_keeps_its_decision_id_on_the_deny():
    h = make_harness(engine=RaisingEngine(PolicyMalformed("garbled", decision_id="d-9")))
    decision = await h.app.decide(INPUT)
    assert decision.decision_id == "d-9"


async def test_an_allow_is_counted_under_none_and_each_deny_reason_on_its_own():
    h = make_harness(lambda _i: allow_with())
    before_allow = _decisions("allow", "none")
    await h.app.decide(INPUT)
    assert _decisions("allow", "none") == before_allow + 1
    h.set_decision(lambda _i: deny_with("NO_ROLE", "PURPOSE_REQUIRED"))
    before = (_decisions("deny", "NO_ROLE"), _decisions("deny", "PURPOSE_REQUIRED"))
    await h.app.decide(INPUT)
    assert (_decisions("deny", "NO_ROLE"), _decisions("deny", "PURPOSE_REQUIRED")) == (
        before[0] + 1,
        before[1] + 1,
    )


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
    h = make_harness(lambda _i: active, shadow_engine=FakePolicyEngine(lambda _i: candidate))
    before = _divergences(kind)
    decision = await h.app.decide(INPUT)
    assert decision == active
    [record] = h.sink.records
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

    def __init__(self, decision: Decision, gate: asyncio.Event, started: asyncio.Event) -> None:
        self.decision, self.gate, self.started = decision, gate, started

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision:
        self.started.set()
        await self.gate.wait()
        return self.decision

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]:
        return frozenset()


async def test_the_shadow_policy_is_asked_at_the_same_time_as_the_active_one_not_after():
    active_started, shadow_started = asyncio.Event(), asyncio.Event()
    # The active engine answers only once the shadow has been asked: run one after the other, this deadlocks.
    active = GatedEngine(allow_with(), shadow_started, active_started)
    shadow = GatedEngine(allow_with(), asyncio.Event(), shadow_started)
    shadow.gate = active_started
    h = make_harness(engine=active, shadow_engine=shadow)
    decision = await asyncio.wait_for(h.app.decide(INPUT), timeout=5)
    assert decision.allow


async def test_an_agreeing_shadow_writes_nothing():
    h = make_harness(
        lambda _i: allow_with(), shadow_engine=FakePolicyEngine(lambda _i: allow_with(decision_id="other-id"))
    )
    await h.app.decide(INPUT)
    assert h.sink.records == []


@pytest.mark.parametrize("exc", [PolicyTimeout("slow"), RuntimeError("candidate bug")])
async def test_a_failing_shadow_is_a_candidate_deny_and_the_active_allow_stands(exc: Exception):
    h = make_harness(lambda _i: allow_with(), shadow_engine=RaisingEngine(exc))
    decision = await h.app.decide(INPUT)
    assert decision.allow
    assert [(r.kind, r.extra["divergence"]) for r in h.sink.records] == [("shadow_divergence", "narrowing")]


async def test_visible_tools_are_the_policys_answer_within_enabled_minus_unavailable():
    engine = FakePolicyEngine(
        visible=frozenset({"read_patient", "search_observations", "refresh", "not_enabled"})
    )
    h = make_harness(
        engine=engine,
        enabled_tools=frozenset({"read_patient", "search_observations", "refresh", "patient_summary"}),
        unavailable_tools={"refresh": ("system/Patient.rs",)},
    )
    assert await h.app.visible_tools(SUBJECT) == frozenset({"read_patient", "search_observations"})


@pytest.mark.parametrize("exc", [PolicyUnavailable("down"), RuntimeError("bug")])
async def test_visible_tools_are_empty_when_the_engine_fails(exc: Exception):
    h = make_harness(engine=RaisingEngine(exc))
    assert await h.app.visible_tools(SUBJECT) == frozenset()


async def test_an_audit_failure_marks_the_trail_unhealthy_and_a_later_success_heals_it():
    from mcp_fhir._exceptions import AuditUnavailable
    from mcp_fhir.audit.record import AuditRecord, utc_now_ms

    h = make_harness()
    h.sink.fail = True
    with pytest.raises(AuditUnavailable):
        await h.app.write_audit(AuditRecord(ts=utc_now_ms(), request_id="r"))
    assert not h.app.audit_healthy
    h.sink.fail = False
    await h.app.write_audit(AuditRecord(ts=utc_now_ms(), request_id="r"))
    assert h.app.audit_healthy


async def test_one_audited_call_is_one_observation_of_the_audit_write_histogram(tmp_path):
    from mcp_fhir.audit.record import AuditRecord, utc_now_ms
    from mcp_fhir.audit.settings import AuditSettings
    from mcp_fhir.audit.trail import build_trail

    trail = build_trail(AuditSettings(sink="file", path=str(tmp_path / "audit.jsonl"), writer_id="w"))
    await trail.start()
    h = make_harness()
    h.app.audit = trail
    before = metrics.REGISTRY.get_sample_value("mcp_fhir_audit_write_seconds_count") or 0.0
    try:
        await h.app.write_audit(AuditRecord(ts=utc_now_ms(), request_id="r"))
    finally:
        await trail.close()
    assert metrics.REGISTRY.get_sample_value("mcp_fhir_audit_write_seconds_count") == before + 1
