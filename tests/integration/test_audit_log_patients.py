"""`search_audit_log` and the patient it filters on (#16 §1), end to end: the official MCP client, the real
OPA and the real FHIR test bed.

The tool sends its `patient_id` filter as the decision input's `resource.patient`, names that patient in
its own audit record, and enforces the `audit_patients` obligation of its allowed decisions (an allow
without it fails closed, `opa_malformed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import AUDITOR, CLINICIAN, sidecar_config

pytestmark = pytest.mark.integration

PATIENT_A = data.AU_PATIENT_ID
PATIENT_B = "pat-au-002"
ADMIN = {
    "id": "agent-admin",
    "claims": {"roles": ["admin"], "sub": "agent-admin"},
    "scopes": ["user/AuditEvent.rs"],
}
BOUND_AUDITOR = {**AUDITOR, "claims": {**AUDITOR["claims"], "patient": f"Patient/{PATIENT_A}"}}


def _records(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if "record" in line and line["record"]["kind"] == "access"]


@pytest.fixture
async def trail_with_two_patients(tmp_path: Path, fhir_server: Any) -> Path:
    """A trail holding reads of patient A and of patient B by a clinician."""
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN))
    async with Client(build_server(settings)) as client:
        for patient in (PATIENT_A, PATIENT_B, PATIENT_B):
            result = await client.call_tool("read_patient", {"patient_id": patient, "purpose": "treatment"})
            assert not result.is_error
    return tmp_path


async def _search_as(identity: dict[str, Any], workdir: Path, fhir_server: Any, **arguments: Any) -> Any:
    settings = config.from_mapping(sidecar_config(workdir, fhir_server.base_url, identity=identity))
    async with Client(build_server(settings)) as client:
        return await client.call_tool("search_audit_log", {"purpose": "audit", **arguments})


def _error(result: Any) -> dict[str, Any]:
    assert result.is_error
    return json.loads(result.content[0].text)


async def test_a_patient_bound_auditor_filtering_on_another_patient_is_denied_and_the_record_names_it(
    trail_with_two_patients: Path, fhir_server: Any
):
    result = await _search_as(BOUND_AUDITOR, trail_with_two_patients, fhir_server, patient_id=PATIENT_B)
    err = _error(result)
    assert err["code"] == "policy_denied" and "PATIENT_MISMATCH" in err["reasons"]
    own = _records(trail_with_two_patients / "audit.jsonl")[-1]
    assert (own["tool"], own["result"], own["patient"]) == ("search_audit_log", "denied", PATIENT_B)
    assert own["decision_input"]["resource"]["patient"] == PATIENT_B


async def test_an_admin_may_not_filter_the_audit_log_by_patient(
    trail_with_two_patients: Path, fhir_server: Any
):
    result = await _search_as(ADMIN, trail_with_two_patients, fhir_server, patient_id=PATIENT_A)
    err = _error(result)
    assert err["code"] == "policy_denied" and "PATIENT_FILTER_NOT_PERMITTED" in err["reasons"]
    own = _records(trail_with_two_patients / "audit.jsonl")[-1]
    assert (own["result"], own["patient"]) == ("denied", PATIENT_A)


async def test_an_auditor_filtering_on_a_patient_sees_only_that_patients_events_and_is_audited_with_it(
    trail_with_two_patients: Path, fhir_server: Any
):
    result = await _search_as(AUDITOR, trail_with_two_patients, fhir_server, patient_id=PATIENT_B)
    assert not result.is_error, result.content[0].text
    events = result.structured_content["events"]
    assert len(events) == 2 and all(
        PATIENT_B in json.dumps(e) and PATIENT_A not in json.dumps(e) for e in events
    )
    own = _records(trail_with_two_patients / "audit.jsonl")[-1]
    assert (own["tool"], own["result"], own["patient"], own["returned_count"]) == (
        "search_audit_log",
        "allowed",
        PATIENT_B,
        2,
    )


async def test_a_patient_bound_auditor_without_a_filter_sees_no_other_patients_events(
    trail_with_two_patients: Path, fhir_server: Any
):
    result = await _search_as(BOUND_AUDITOR, trail_with_two_patients, fhir_server)
    assert not result.is_error, result.content[0].text
    text = json.dumps(result.structured_content["events"])
    assert PATIENT_B not in text
    assert result.structured_content["count"] >= 1


async def test_an_admin_without_a_filter_is_allowed_and_sees_no_patient(
    trail_with_two_patients: Path, fhir_server: Any
):
    result = await _search_as(ADMIN, trail_with_two_patients, fhir_server)
    assert not result.is_error, result.content[0].text
    text = json.dumps(result.structured_content["events"])
    assert PATIENT_A not in text and PATIENT_B not in text


async def test_an_allow_without_the_audit_patients_obligation_never_returns_events(
    trail_with_two_patients: Path, fhir_server: Any
):
    """Whatever the policy's state: either the obligation came back and is enforced, or the call is denied."""
    result = await _search_as(AUDITOR, trail_with_two_patients, fhir_server, patient_id=PATIENT_B)
    own = _records(trail_with_two_patients / "audit.jsonl")[-1]
    if result.is_error:
        assert "opa_malformed" in _error(result)["reasons"]
        assert own["result"] == "denied"
    else:
        assert all(PATIENT_A not in json.dumps(e) for e in result.structured_content["events"])
