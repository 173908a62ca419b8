"""Export to FHIR R4 AuditEvent (IHE BALP), validated with fhir.resources R4B (AuditEvent: R4 = R4B)."""

from __future__ import annotations

import base64
import json

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from mcp_fhir.audit.export_fhir import to_audit_event, to_bundle, to_ndjson

from .conftest import make_record

CASES = {
    "allowed": ({}, "0"),
    "denied": ({"result": "denied", "reason_codes": ("PURPOSE_NOT_ALLOWED", "SENSITIVE_LABEL")}, "4"),
    "error": ({"result": "error", "error_code": "upstream_timeout", "on_behalf_of": None}, "8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_allowed_denied_and_error_records_export_as_valid_r4_audit_events(case: str) -> None:
    overrides, outcome = CASES[case]
    event = to_audit_event(make_record(3, **overrides), seq=42, writer="sidecar-1")
    model = AuditEvent.model_validate(event)
    assert model.outcome == outcome
    assert model.type.code == "rest"
    assert model.subtype[0].code == "search-type"
    assert model.action == "E"
    assert model.recorded is not None


def test_denied_reasons_and_error_codes_become_the_outcome_description() -> None:
    denied = to_audit_event(make_record(1, **CASES["denied"][0]))
    assert denied["outcomeDesc"] == "PURPOSE_NOT_ALLOWED SENSITIVE_LABEL"
    error = to_audit_event(make_record(1, **CASES["error"][0]))
    assert error["outcomeDesc"] == "upstream_timeout"


def test_the_agent_the_user_and_the_sidecar_are_agents_and_the_sidecar_observes() -> None:
    event = to_audit_event(make_record(1), writer="sidecar-1")
    agents = event["agent"]
    assert agents[0]["who"]["identifier"]["value"] == "agent-scribe" and agents[0]["requestor"] is True
    assert agents[0]["type"]["coding"][0]["code"] == "110153"
    assert agents[1]["who"]["identifier"]["value"] == "dr-jones"
    assert agents[1]["type"]["coding"][0]["code"] == "humanuser"
    assert agents[2]["requestor"] is False
    assert event["source"]["observer"]["identifier"]["value"] == "sidecar-1"


def test_patient_query_and_decision_entities_follow_balp() -> None:
    event = to_audit_event(make_record(1))
    patient, query, decision = event["entity"]
    assert patient["what"]["reference"] == "Patient/pat-1"
    assert patient["role"]["code"] == "1"
    assert query["role"]["code"] == "24"
    assert base64.b64decode(query["query"]).decode() == "Observation?_count=20&category=laboratory"
    assert decision["what"]["identifier"] == {"system": "urn:mcp-fhir:opa-decision-id", "value": "dec-1"}
    assert {"type": "policy_revision", "valueString": "rev-1"} in decision["detail"]


def test_purpose_maps_to_act_reason_and_keeps_the_raw_text() -> None:
    known = to_audit_event(make_record(1, purpose="treatment"))["purposeOfEvent"][0]
    assert known == {"text": "treatment", "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                                      "code": "TREAT"}]}  # fmt: skip
    unknown = to_audit_event(make_record(1, purpose="something_local"))["purposeOfEvent"][0]
    assert unknown == {"text": "something_local"}


def test_reads_are_action_r_and_alerts_are_security_alerts() -> None:
    read = to_audit_event(make_record(1, operation="read", params={}))
    assert read["action"] == "R"
    alert = to_audit_event(make_record(1, kind="alert", alerts=("after_hours",), operation=None, params={}))
    AuditEvent.model_validate(alert)
    assert alert["type"]["code"] == "110113"


def test_a_calls_alerts_travel_inside_its_own_access_event() -> None:
    # search_audit_log returns access records as AuditEvents: a call's alerts are in the decision detail.
    event = to_audit_event(make_record(1, alerts=("after_hours", "denial_burst")))
    AuditEvent.model_validate(event)
    assert event["type"]["code"] == "rest"
    [decision] = [e for e in event["entity"] if e.get("name") == "policy decision"]
    assert {"type": "alerts", "valueString": '["after_hours","denial_burst"]'} in decision["detail"]


def test_a_bundle_and_ndjson_hold_every_event() -> None:
    events = [to_audit_event(make_record(n), seq=n) for n in range(3)]
    bundle = to_bundle(events)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection" and len(bundle["entry"]) == 3
    lines = to_ndjson(events).splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["mcp-fhir-0", "mcp-fhir-1", "mcp-fhir-2"]
