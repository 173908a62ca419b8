"""The decision call path end to end: the official MCP client, the real OPA, the real FHIR test bed.

Each test drives `build_server(settings)` through `mcp.Client`, so every step runs for real:
authentication (the configured local identity), validation, canonicalisation, the OPA decision,
the FHIR read, obligation enforcement, the durable audit record, and the response.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, NURSE, POLICIES, sidecar_config

pytestmark = pytest.mark.integration


def audit_lines(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if "record" in line]


def error_of(result) -> dict:
    assert result.is_error, "expected a tool error"
    return json.loads(result.content[0].text)


async def test_an_allowed_read_returns_the_patient_and_writes_an_audit_record_first(tmp_path, fhir_server):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=NURSE))
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert not result.is_error, result.content[0].text
    body = result.structured_content
    assert body["resources"][0]["id"] == data.AU_PATIENT_ID
    assert body["provenance"]["backend"] == "testbed"
    assert body["provenance"]["decision_id"]
    [record] = [r for r in audit_lines(tmp_path / "audit.jsonl") if r["kind"] == "access"]
    assert record["result"] == "allowed"
    assert record["tool"] == "read_patient"
    assert record["patient"] == data.AU_PATIENT_ID
    assert record["decision_id"] == body["provenance"]["decision_id"]
    assert record["returned_count"] == 1


async def test_a_denied_call_is_a_tool_error_with_reason_codes_and_decision_id_and_is_audited(
    tmp_path, fhir_server
):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=NURSE))
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "search_medication_statements", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    err = error_of(result)
    assert err["code"] == "policy_denied"
    assert err["reasons"]
    assert err["decision_id"]
    [record] = [r for r in audit_lines(tmp_path / "audit.jsonl") if r["kind"] == "access"]
    assert record["result"] == "denied"
    assert record["reason_codes"] == err["reasons"]
    assert record["decision_id"] == err["decision_id"]


async def test_stopping_opa_mid_run_makes_the_next_call_fail_closed_with_opa_unavailable(
    tmp_path, fhir_server
):
    opa = ManagedOpa([POLICIES])
    await opa.start()
    try:
        settings = config.from_mapping(
            sidecar_config(tmp_path, fhir_server.base_url, opa_url=opa.url, identity=CLINICIAN)
        )
        async with Client(build_server(settings)) as client:
            args = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
            first = await client.call_tool("read_patient", args)
            assert not first.is_error
            await opa.stop()
            second = await client.call_tool("read_patient", args)
    finally:
        await opa.stop()
    err = error_of(second)
    assert err["code"] == "policy_denied"
    assert err["reasons"] == ["opa_unavailable"]
    records = [r for r in audit_lines(tmp_path / "audit.jsonl") if r["kind"] == "access"]
    assert [r["result"] for r in records] == ["allowed", "denied"]
    assert records[1]["returned_count"] is None
