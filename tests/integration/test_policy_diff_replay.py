"""Replaying a real audit trail: calls through the sidecar, then `mcp-fhir policy diff --replay` over it.

The trail is produced in the test by the official MCP client against `build_server(settings)` (real
OPA, real FHIR test bed). The recorded `decision_input`s are then replayed against `policies/` and
a copy where the nurse role gains MedicationStatement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.cli.main import main
from mcp_fhir.governance.grid import replay_cases
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import NURSE, POLICIES, policies_with_nurse_reading_medications, sidecar_config

pytestmark = pytest.mark.integration

NURSE_WITH_MEDS = {**NURSE, "scopes": [*NURSE["scopes"], "user/MedicationStatement.rs"]}


async def produce_trail(workdir: Path, fhir_url: str) -> Path:
    settings = config.from_mapping(sidecar_config(workdir, fhir_url, identity=NURSE_WITH_MEDS))
    args = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
    async with Client(build_server(settings)) as client:
        assert not (await client.call_tool("read_patient", args)).is_error
        assert not (await client.call_tool("search_observations", args)).is_error
        assert (await client.call_tool("search_medication_statements", args)).is_error
        assert (await client.call_tool("search_medication_statements", args)).is_error
    return workdir / "audit.jsonl"


async def test_replaying_a_recorded_trail_reports_the_widening_of_the_recorded_calls(tmp_path, fhir_server):
    trail = await produce_trail(tmp_path / "sidecar", fhir_server.base_url)
    cases = replay_cases(trail)
    assert [c.input["action"]["tool"] for c in cases] == [
        "read_patient", "search_observations", "search_medication_statements", "search_medication_statements",
    ]  # fmt: skip
    head = policies_with_nurse_reading_medications(tmp_path)
    out, html = tmp_path / "diff.json", tmp_path / "diff.html"
    code = main(["policy", "diff", str(POLICIES), str(head), "--replay", str(trail), "--no-grid", "--no-fixtures",
                 "--format", "json", "--out", str(out), "--html", str(html), "--quiet"])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 1
    assert report["by_source"] == {"replay": 4}
    assert report["counts"] == {"widening": 2, "narrowing": 0, "changed": 0}
    [group] = [g for g in report["groups"] if g["classification"] == "widening"]
    assert (group["role"], group["tool"], group["purpose"], group["reason"]) == (
        "nurse", "search_medication_statements", "treatment", "ROLE_NOT_PERMITTED",
    )  # fmt: skip
    assert group["count"] == 2
    assert group["examples"][0]["source"] == "replay"
    # the recorded inputs carry no PHI beyond the canonical patient id the policy needs
    assert data.KNOWN_PHI and not any(phi in out.read_text() for phi in data.KNOWN_PHI)
    assert "<script" not in html.read_text() and "http" not in html.read_text().split("<body", 1)[0]
