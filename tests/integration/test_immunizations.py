"""`search_immunizations` end to end: the official MCP client, the real OPA, the real FHIR test bed.

The test bed's synthetic data set has no Immunization, so this module PUTs three (two for the
patient, one for another patient) with ids of its own before it runs.
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
from tests.testbed.sidecar import CLINICIAN, NURSE, sidecar_config

pytestmark = pytest.mark.integration

OTHER_PATIENT = "pat-au-002"
CVX = "http://hl7.org/fhir/sid/cvx"


def _immunization(rid: str, patient: str, code: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Immunization",
        "id": rid,
        "status": "completed",
        "vaccineCode": {"coding": [{"system": CVX, "code": code}], "text": f"CVX {code}"},
        "patient": {"reference": f"Patient/{patient}"},
        "occurrenceDateTime": when,
        "primarySource": True,
    }


@pytest.fixture(scope="module")
def immunizations(fhir_server: Any) -> dict[str, dict[str, Any]]:
    resources = {
        "imm-e2e-flu": _immunization("imm-e2e-flu", data.AU_PATIENT_ID, "140", "2026-04-02"),
        "imm-e2e-tdap": _immunization("imm-e2e-tdap", data.AU_PATIENT_ID, "115", "2019-08-15"),
        "imm-e2e-other": _immunization("imm-e2e-other", OTHER_PATIENT, "140", "2026-04-03"),
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"Immunization/{rid}"}}
            for rid, r in resources.items()
        ],
    }
    fhir_server.load([("immunizations", json.dumps(bundle))])
    return resources


def _access(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if "record" in line and line["record"]["kind"] == "access"]


async def test_a_clinician_searches_one_patients_immunizations_and_the_call_is_audited(
    tmp_path: Path, fhir_server: Any, immunizations: dict[str, Any]
):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN))
    async with Client(build_server(settings)) as client:
        listed = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool(
            "search_immunizations", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert "search_immunizations" in listed
    assert not result.is_error, result.content[0].text
    body = result.structured_content
    assert body["resource_type"] == "Immunization"
    assert sorted(r["id"] for r in body["resources"]) == ["imm-e2e-flu", "imm-e2e-tdap"]
    [record] = _access(tmp_path / "audit.jsonl")
    assert (record["result"], record["tool"], record["resource_type"], record["patient"]) == (
        "allowed",
        "search_immunizations",
        "Immunization",
        data.AU_PATIENT_ID,
    )
    assert record["returned_count"] == 2 and record["decision_id"] == body["provenance"]["decision_id"]


async def test_the_vaccine_code_and_date_filters_reach_the_ehr_and_the_decision_input(
    tmp_path: Path, fhir_server: Any, immunizations: dict[str, Any]
):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN))
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "search_immunizations",
            {
                "patient_id": data.AU_PATIENT_ID,
                "purpose": "treatment",
                "code": f"{CVX}|140",
                "date_from": "2026-01-01",
            },
        )
    assert [r["id"] for r in result.structured_content["resources"]] == ["imm-e2e-flu"]
    [record] = _access(tmp_path / "audit.jsonl")
    assert record["decision_input"]["resource"]["params"] == {"code": f"{CVX}|140", "date_from": "2026-01-01"}


async def test_a_nurse_may_not_search_immunizations_and_the_ehr_is_never_asked(
    tmp_path: Path, fhir_server: Any, immunizations: dict[str, Any]
):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=NURSE))
    async with Client(build_server(settings)) as client:
        listed = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool(
            "search_immunizations", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert "search_immunizations" not in listed
    assert result.is_error
    err = json.loads(result.content[0].text)
    assert err["code"] == "policy_denied" and "ROLE_NOT_PERMITTED" in err["reasons"]
    [record] = _access(tmp_path / "audit.jsonl")
    assert (record["result"], record["returned_count"]) == ("denied", None)
