"""Admin tools: `search_audit_log` tells the policy which patient it filters on, enforces the
`audit_patients` obligation, applies the policy's `AuditEvent.*` redactions and caps generically;
`refresh` is rationed per caller by a sliding one-minute window."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from mcp_fhir._exceptions import PolicyDenied, UpstreamRateLimited
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.policy.engine import Obligations
from mcp_fhir.tools.admin import REFRESH_PER_MINUTE, RefreshLimiter
from tests.tools.conftest import OTHER_PATIENT, PATIENT, Harness, allow_with, make_harness, observation

ANY_PATIENT = frozenset({"audit_patients"})  # `audit_patients: null` came back: any patient


def _records(n: int, patient: str = PATIENT) -> list[AuditRecord]:
    return [
        AuditRecord(
            ts="2026-11-20T01:02:03.000Z",
            request_id=f"r{i}-{patient}",
            subject_id="agent-9",
            tool="read_patient",
            resource_type="Patient",
            operation="read",
            patient=patient,
            purpose="treatment",
            decision_id=f"d{i}",
        )
        for i in range(n)
    ]


def _stored(n: int) -> list[dict[str, Any]]:
    return [r.to_dict() for r in _records(n)]


def _audit_harness(ob: Obligations, n: int = 3, *, others: int = 0) -> Harness:
    if "audit_patients" not in ob.present:
        ob = replace(ob, present=ANY_PATIENT)
    h = make_harness(lambda _i: allow_with(ob))
    h.sink.records += _records(n) + _records(others, OTHER_PATIENT)
    return h


async def _audit_log(h: Harness, **arguments: Any) -> Any:
    return await h.run("search_audit_log", purpose="audit", **arguments)


def _own(h: Harness) -> list[AuditRecord]:
    """The records the search itself wrote (the harness trail was seeded with others first)."""
    return [r for r in h.sink.records if r.tool == "search_audit_log"]


@pytest.mark.parametrize("element", ["entity", "agent", "purposeOfEvent"])
async def test_search_audit_log_applies_any_auditevent_redaction_the_policy_names(element: str):
    h = _audit_harness(Obligations(redact=(f"AuditEvent.{element}", "Patient.address")))
    result = await _audit_log(h, limit=50)
    assert result.structured_content["count"] == 3
    events = result.structured_content["events"]
    assert all(element not in e for e in events)
    assert all(element in _plain_event(r) for r in _stored(3))  # each event had it
    assert result.structured_content["redacted_elements"] == 3


def _plain_event(record: dict[str, Any]) -> dict[str, Any]:
    from mcp_fhir.audit.export_fhir import to_audit_event

    return to_audit_event(record)


async def test_search_audit_log_without_redactions_keeps_the_patient_entity():
    h = _audit_harness(Obligations())
    result = await _audit_log(h, limit=50)
    assert all("entity" in e for e in result.structured_content["events"])
    assert result.structured_content["redacted_elements"] == 0


async def test_search_audit_log_asks_for_no_more_than_the_policys_cap_and_audits_what_it_returned():
    h = _audit_harness(Obligations(max_results=2), n=5)
    result = await _audit_log(h, patient_id=PATIENT, limit=50)
    assert h.sink.queries[0].patient == PATIENT
    assert result.structured_content["count"] == 2
    assert [(r.tool, r.returned_count) for r in _own(h)] == [("search_audit_log", 2)]


async def test_search_audit_log_sends_its_patient_filter_as_the_decision_inputs_patient():
    h = _audit_harness(Obligations())
    await _audit_log(h, patient_id=PATIENT, agent_id="agent-9", limit=10)
    [d_input] = h.engine.calls
    assert d_input["resource"] == {"patient": PATIENT, "params": {"agent_id": "agent-9", "limit": 10}}
    assert [(r.tool, r.patient) for r in _own(h)] == [("search_audit_log", PATIENT)]


async def test_search_audit_log_with_any_patient_allowed_returns_events_about_every_patient():
    h = _audit_harness(Obligations(), n=2, others=2)
    result = await _audit_log(h)
    assert result.structured_content["count"] == 4


async def test_search_audit_log_bound_to_one_patient_restricts_the_query_and_returns_only_that_patient():
    h = _audit_harness(Obligations(audit_patients=frozenset({PATIENT}), present=ANY_PATIENT), n=2, others=3)
    result = await _audit_log(h)
    assert h.sink.queries[0].patient == PATIENT
    assert result.structured_content["count"] == 2
    assert all(
        PATIENT in str(e["entity"]) and OTHER_PATIENT not in str(e)
        for e in result.structured_content["events"]
    )


async def test_search_audit_log_bound_to_several_patients_filters_the_results_again():
    h = _audit_harness(
        Obligations(audit_patients=frozenset({PATIENT, "pat-3"}), present=ANY_PATIENT), n=2, others=3
    )
    result = await _audit_log(h)
    assert result.structured_content["count"] == 2
    assert [(r.returned_count, r.filtered_count) for r in _own(h)] == [(2, 3)]


async def test_search_audit_log_filtering_on_a_patient_outside_the_obligation_returns_nothing():
    h = _audit_harness(Obligations(audit_patients=frozenset({PATIENT}), present=ANY_PATIENT), others=3)
    result = await _audit_log(h, patient_id=OTHER_PATIENT)
    assert result.structured_content["count"] == 0
    assert h.sink.queries == []
    assert [(r.result, r.patient) for r in _own(h)] == [("allowed", OTHER_PATIENT)]


async def test_search_audit_log_allowed_without_the_audit_patients_obligation_fails_closed():
    h = make_harness(lambda _i: allow_with(Obligations()))
    h.sink.records += _records(2)
    with pytest.raises(PolicyDenied) as caught:
        await h.run("search_audit_log", purpose="audit")
    assert caught.value.reasons == ["opa_malformed"]
    assert h.sink.queries == []
    assert [(r.result, r.reason_codes) for r in h.sink.records[2:]] == [("denied", ("opa_malformed",))]


def test_the_refresh_limiter_allows_its_quota_then_refuses_with_a_rate_limit_code():
    limiter = RefreshLimiter()
    for i in range(REFRESH_PER_MINUTE):
        limiter.check("agent-1", now=100.0 + i)
    with pytest.raises(UpstreamRateLimited) as caught:
        limiter.check("agent-1", now=100.0 + REFRESH_PER_MINUTE)
    assert caught.value.code == "upstream_rate_limited"


def test_the_refresh_limiter_window_slides_and_each_caller_has_its_own():
    limiter = RefreshLimiter(per_minute=2)
    limiter.check("a", now=0.0)
    limiter.check("a", now=30.0)
    limiter.check("b", now=30.0)  # another caller is not affected
    with pytest.raises(UpstreamRateLimited):
        limiter.check("a", now=59.0)
    limiter.check("a", now=60.5)  # the first call has left the window
    with pytest.raises(UpstreamRateLimited):
        limiter.check("a", now=61.0)


def test_a_refused_refresh_does_not_use_up_a_slot():
    limiter = RefreshLimiter(per_minute=1)
    limiter.check("a", now=0.0)
    for t in (10.0, 20.0, 30.0):
        with pytest.raises(UpstreamRateLimited):
            limiter.check("a", now=t)
    limiter.check("a", now=61.0)


async def test_refresh_bypasses_the_cache_and_is_refused_before_the_policy_once_rationed():
    h = make_harness(resources=[observation("o1")])
    seen: list[bool] = []
    search = h.ehr.search

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("bypass_cache", False))
        return await search(*args, **kwargs)

    h.ehr.search = spy  # type: ignore[method-assign]
    for _ in range(REFRESH_PER_MINUTE):
        await h.run("refresh", patient_id=PATIENT, resource_type="Observation", purpose="treatment")
    calls_before = len(h.engine.calls)
    with pytest.raises(UpstreamRateLimited):
        await h.run("refresh", patient_id=PATIENT, resource_type="Observation", purpose="treatment")
    assert seen == [True] * REFRESH_PER_MINUTE
    assert len(h.engine.calls) == calls_before
