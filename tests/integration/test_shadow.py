"""Shadow mode: a candidate policy decides beside the active one; only the active decision is enforced.

The candidate is a copy of `policies/` where the nurse role gains MedicationStatement. The sidecar
runs it in a second managed OPA (`opa.shadow_policies`), and the official MCP client drives real
calls through `build_server(settings)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client

from mcp_fhir import config, metrics
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import NURSE, policies_with_nurse_reading_medications, sidecar_config

pytestmark = pytest.mark.integration

# the nurse's credential also grants the MedicationStatement scope, so only the role data decides
NURSE_WITH_MEDS = {**NURSE, "scopes": [*NURSE["scopes"], "user/MedicationStatement.rs"]}
DECIDED_KINDS = ("access", "shadow_divergence")


def records(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # alert records (e.g. after_hours, which depends on the wall clock) are not what these tests check
    return [line["record"] for line in lines if "record" in line and line["record"]["kind"] in DECIDED_KINDS]


def divergences(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_shadow_divergences_total", {"kind": kind}) or 0.0


async def test_a_disagreeing_candidate_is_recorded_and_counted_but_the_active_decision_is_enforced(
    tmp_path, fhir_server
):
    settings = config.from_mapping(
        sidecar_config(
            tmp_path,
            fhir_server.base_url,
            identity=NURSE_WITH_MEDS,
            opa={
                "shadow_policies": str(
                    policies_with_nurse_reading_medications(tmp_path, "candidate-policies")
                )
            },
        )
    )
    before = divergences("widening")
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "search_medication_statements", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert result.is_error, "the candidate's allow leaked into enforcement"
    assert json.loads(result.content[0].text)["code"] == "policy_denied"
    trail = records(tmp_path / "audit.jsonl")
    [shadow] = [r for r in trail if r["kind"] == "shadow_divergence"]
    [access] = [r for r in trail if r["kind"] == "access"]
    assert access["result"] == "denied"
    assert shadow["result"] == "denied"
    assert shadow["tool"] == "search_medication_statements"
    assert shadow["extra"]["divergence"] == "widening"
    assert shadow["extra"]["candidate"]["allow"] is True
    assert shadow["decision_id"] == access["decision_id"]
    assert divergences("widening") == before + 1


async def test_a_call_on_which_both_policies_agree_leaves_no_divergence(tmp_path, fhir_server):
    settings = config.from_mapping(
        sidecar_config(
            tmp_path,
            fhir_server.base_url,
            identity=NURSE_WITH_MEDS,
            opa={
                "shadow_policies": str(
                    policies_with_nurse_reading_medications(tmp_path, "candidate-policies")
                )
            },
        )
    )
    before = sum(divergences(k) for k in ("widening", "narrowing", "obligations"))
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert not result.is_error, result.content[0].text
    trail = records(tmp_path / "audit.jsonl")
    assert [r["kind"] for r in trail] == ["access"]
    assert sum(divergences(k) for k in ("widening", "narrowing", "obligations")) == before
