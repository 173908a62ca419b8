"""Admin tools: `search_audit_log` applies the policy's `AuditEvent.*` redactions and caps generically,
and `refresh` is rationed per caller by a sliding one-minute window."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_fhir._exceptions import UpstreamRateLimited
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.policy.engine import Obligations
from mcp_fhir.tools.admin import REFRESH_PER_MINUTE, _RefreshLimiter, register
from tests.tools.conftest import PATIENT, Harness, allow_with, make_harness, observation, registered_tools


def _tools() -> dict[str, Any]:
    return registered_tools(register)


def _stored(n: int) -> list[dict[str, Any]]:
    return [
        AuditRecord(
            ts="2026-11-20T01:02:03.000Z",
            request_id=f"r{i}",
            subject_id="agent-9",
            tool="read_patient",
            resource_type="Patient",
            operation="read",
            patient=PATIENT,
            purpose="treatment",
            decision_id=f"d{i}",
        ).to_dict()
        for i in range(n)
    ]


def _audit_harness(ob: Obligations, n: int = 3) -> Harness:
    h = make_harness(lambda _i: allow_with(ob), audit_query=lambda **k: k)
    h.sink.stored = _stored(n)
    return h


@pytest.mark.parametrize("element", ["entity", "agent", "purposeOfEvent"])
async def test_search_audit_log_applies_any_auditevent_redaction_the_policy_names(element: str):
    h = _audit_harness(Obligations(redact=(f"AuditEvent.{element}", "Patient.address")))
    result = await _tools()["search_audit_log"](ctx=h.ctx, purpose="audit", limit=50)
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
    result = await _tools()["search_audit_log"](ctx=h.ctx, purpose="audit", limit=50)
    assert all("entity" in e for e in result.structured_content["events"])
    assert result.structured_content["redacted_elements"] == 0


async def test_search_audit_log_asks_for_no_more_than_the_policys_cap_and_audits_what_it_returned():
    h = _audit_harness(Obligations(max_results=2), n=5)
    result = await _tools()["search_audit_log"](ctx=h.ctx, purpose="audit", patient_id=PATIENT, limit=50)
    assert h.sink.queries[0]["limit"] == 2
    assert h.sink.queries[0]["filter"]["patient"] == PATIENT
    assert result.structured_content["count"] == 2
    assert [(r.tool, r.returned_count) for r in h.sink.records] == [("search_audit_log", 2)]


def test_the_refresh_limiter_allows_its_quota_then_refuses_with_a_rate_limit_code():
    limiter = _RefreshLimiter()
    for i in range(REFRESH_PER_MINUTE):
        limiter.check("agent-1", now=100.0 + i)
    with pytest.raises(UpstreamRateLimited) as caught:
        limiter.check("agent-1", now=100.0 + REFRESH_PER_MINUTE)
    assert caught.value.code == "upstream_rate_limited"


def test_the_refresh_limiter_window_slides_and_each_caller_has_its_own():
    limiter = _RefreshLimiter(per_minute=2)
    limiter.check("a", now=0.0)
    limiter.check("a", now=30.0)
    limiter.check("b", now=30.0)  # another caller is not affected
    with pytest.raises(UpstreamRateLimited):
        limiter.check("a", now=59.0)
    limiter.check("a", now=60.5)  # the first call has left the window
    with pytest.raises(UpstreamRateLimited):
        limiter.check("a", now=61.0)


def test_a_refused_refresh_does_not_use_up_a_slot():
    limiter = _RefreshLimiter(per_minute=1)
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
    refresh = _tools()["refresh"]
    for _ in range(REFRESH_PER_MINUTE):
        await refresh(patient_id=PATIENT, resource_type="Observation", ctx=h.ctx, purpose="treatment")
    calls_before = len(h.engine.calls)
    with pytest.raises(UpstreamRateLimited):
        await refresh(patient_id=PATIENT, resource_type="Observation", ctx=h.ctx, purpose="treatment")
    assert seen == [True] * REFRESH_PER_MINUTE
    assert len(h.engine.calls) == calls_before
