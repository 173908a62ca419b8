"""Patient consent in every decision, end to end (issue #21 §1): the official MCP client, the real OPA
with the shipped policy, and the FHIR test bed holding the FHIR specification's Consent examples.

The module loads, under ids of its own, the fixtures of `tests/data/consent/` (see its SOURCES.md):
`ai-opt-out.json` (ours: opt-out of AI processing) for pat-au-002, `au-mhr-restricted.json` (a My Health
Record-style PSY/R restriction) for pat-au-001, and `spec-notTime.json` (after the spec's
`consent-example-notTime`, its period ended) and `spec-notThem.json` (after `consent-example-notThem`)
for pat-us-healthy. The sidecar reads them from the EHR (`consent.source: ehr`); one test reads the
local SQLite store instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.consent import SqliteConsentStore
from mcp_fhir.server import build_server
from tests.adversarial.conftest import attempt, audit_records, tool_error
from tests.adversarial.conftest import opa_url as opa_url  # the session's real OPA (a fixture)
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, sidecar_config

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "consent"
OPTED_OUT = data.AU_DVA_PATIENT_ID  # pat-au-002
RESTRICTED = data.AU_PATIENT_ID  # pat-au-001: holds the PSY-labelled psychiatric note
EXPIRED = "pat-us-healthy"
BREAK_GLASS = "Unconscious patient in ED; need full history."
ON_CONSENT = {"consent": {"enabled": True, "source": "ehr", "ttl_seconds": 60}}


def consent_for(name: str, patient: str, rid: str) -> dict[str, Any]:
    """A fixture from tests/data/consent, re-pointed at `patient` under the id `rid`."""
    resource = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return {**resource, "id": rid, "patient": {"reference": f"Patient/{patient}"}}


@pytest.fixture(scope="module")
def consents(fhir_server: Any) -> dict[str, dict[str, Any]]:
    resources = {
        "wire-ai-opt-out": consent_for("ai-opt-out.json", OPTED_OUT, "wire-ai-opt-out"),
        "wire-mhr-psy": consent_for("au-mhr-restricted.json", RESTRICTED, "wire-mhr-psy"),
        "wire-not-time": consent_for("spec-notTime.json", EXPIRED, "wire-not-time"),
        "wire-not-them": consent_for("spec-notThem.json", EXPIRED, "wire-not-them"),
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"Consent/{rid}"}}
            for rid, r in resources.items()
        ],
    }
    fhir_server.load([("consents", json.dumps(bundle))])
    return resources


async def _call(
    workdir: Path, fhir_server: Any, opa_url: str, tool: str, args: dict[str, Any], **cfg: Any
) -> Any:
    settings = config.from_mapping(
        sidecar_config(workdir, fhir_server.base_url, opa_url=opa_url, identity=CLINICIAN, **cfg)
    )
    async with Client(build_server(settings)) as client:
        return await attempt(client, tool, args)


async def test_a_patient_who_opted_out_of_ai_processing_is_denied_consent_denied(
    tmp_path, fhir_server, opa_url, consents
):
    args = {"patient_id": OPTED_OUT, "purpose": "treatment"}
    result = await _call(tmp_path, fhir_server, opa_url, "search_conditions", args, **ON_CONSENT)
    err = tool_error(result)
    assert (err["code"], err["reasons"]) == ("policy_denied", ["CONSENT_DENIED"])
    record = audit_records(tmp_path)[-1]
    assert (record["result"], record["reason_codes"]) == ("denied", ["CONSENT_DENIED"])
    assert record["decision_input"]["context"]["consent"]["status"] == "ok"


async def test_with_consent_off_the_same_call_is_allowed_and_its_input_has_no_consent(
    tmp_path, fhir_server, opa_url, consents
):
    args = {"patient_id": OPTED_OUT, "purpose": "treatment"}
    result = await _call(tmp_path, fhir_server, opa_url, "search_conditions", args)
    assert not result.is_error
    assert "consent" not in audit_records(tmp_path)[-1]["decision_input"]["context"]


async def test_a_psy_restriction_withholds_the_psy_note_even_under_break_glass(
    tmp_path, fhir_server, opa_url, consents
):
    args = {"patient_id": RESTRICTED, "purpose": "treatment", "break_glass_reason": BREAK_GLASS}
    without = await _call(tmp_path / "off", fhir_server, opa_url, "list_documents", args)
    assert data.PSY_NOTE_ID in {r["id"] for r in without.structured_content["resources"]}
    restricted = await _call(tmp_path / "on", fhir_server, opa_url, "list_documents", args, **ON_CONSENT)
    assert not restricted.is_error
    body = restricted.structured_content
    assert data.PSY_NOTE_ID not in {r["id"] for r in body["resources"]}
    assert body["withheld"]["security_label"] >= 1
    record = audit_records(tmp_path / "on")[-1]
    assert record["result"] == "allowed"


async def test_an_ended_consent_and_one_naming_another_practitioner_have_no_effect(
    tmp_path, fhir_server, opa_url, consents
):
    args = {"patient_id": EXPIRED, "purpose": "treatment"}
    result = await _call(tmp_path, fhir_server, opa_url, "search_conditions", args, **ON_CONSENT)
    assert not result.is_error
    provisions = audit_records(tmp_path)[-1]["decision_input"]["context"]["consent"]["provisions"]
    assert {p["consent"] for p in provisions} == {"wire-not-time", "wire-not-them"}


async def test_the_same_opt_out_read_from_the_local_sqlite_store_denies(tmp_path, fhir_server, opa_url):
    store = SqliteConsentStore(tmp_path / "consent.db")
    await store.put(consent_for("ai-opt-out.json", "pat-us-ckd", "local-opt-out"))
    await store.aclose()
    cfg = {"consent": {"enabled": True, "source": "sqlite", "path": str(tmp_path / "consent.db")}}
    args = {"patient_id": "pat-us-ckd", "purpose": "treatment"}
    err = tool_error(await _call(tmp_path / "w", fhir_server, opa_url, "search_conditions", args, **cfg))
    assert err["reasons"] == ["CONSENT_DENIED"]
