"""`audit_disclosures` end to end (issue #21 §2): the official MCP client, the real OPA with the shipped
policy, the FHIR test bed and the real hash-chained audit trail. A clinician agent reads a patient's
record (one allowed call) and a nurse agent is denied it, then an auditor
asks for that patient's accounting over MCP; an admin, behind the same gates as search_audit_log, may not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.adversarial.conftest import audit_records, tool_error
from tests.adversarial.conftest import opa_url as opa_url  # the session's real OPA (a fixture)
from tests.testbed.sidecar import AUDITOR, CLINICIAN, NURSE, sidecar_config

pytestmark = pytest.mark.integration

PATIENT = "pat-us-hypertension"
ADMIN = {
    "id": "agent-admin",
    "claims": {"roles": ["admin"], "sub": "agent-admin"},
    "scopes": ["user/AuditEvent.rs"],
}


async def _calls(
    workdir: Path, fhir_server: Any, opa: str, identity: dict[str, Any], calls: list[tuple[str, dict]]
) -> list[Any]:
    settings = config.from_mapping(
        sidecar_config(workdir, fhir_server.base_url, opa_url=opa, identity=identity)
    )
    out = []
    async with Client(build_server(settings)) as client:
        for tool, args in calls:
            out.append(await client.call_tool(tool, args))
    return out


async def test_an_auditor_gets_the_patients_accounting_and_an_admin_is_denied(tmp_path, fhir_server, opa_url):
    await _calls(
        tmp_path,
        fhir_server,
        opa_url,
        CLINICIAN,
        [("search_conditions", {"patient_id": PATIENT, "purpose": "treatment"})],
    )
    await _calls(
        tmp_path,
        fhir_server,
        opa_url,
        NURSE,
        [("search_conditions", {"patient_id": PATIENT, "purpose": "treatment"})],
    )
    [report] = await _calls(
        tmp_path,
        fhir_server,
        opa_url,
        AUDITOR,
        [("audit_disclosures", {"patient_id": PATIENT, "purpose": "audit"})],
    )
    assert not report.is_error, report.content[0].text
    body = report.structured_content["report"]
    assert body["patient"] == PATIENT
    assert body["trail"]["verified"] is True
    assert body["summary"]["accesses"] == 1 and body["summary"]["denied"] == 1
    assert [a["agent"] for a in body["accesses"]] == [CLINICIAN["id"]]
    assert [a["agent"] for a in body["denied"]] == [NURSE["id"]]
    [denied] = await _calls(
        tmp_path / "admin",
        fhir_server,
        opa_url,
        ADMIN,
        [("audit_disclosures", {"patient_id": PATIENT, "purpose": "audit"})],
    )
    err = tool_error(denied)
    assert err["reasons"] == ["PATIENT_FILTER_NOT_PERMITTED"]
    assert audit_records(tmp_path)[-1]["tool"] == "audit_disclosures"
