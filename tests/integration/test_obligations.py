"""Each obligation the policy returns, enforced on real FHIR data by the real sidecar.

Real decisions from the real OPA (policies/), real resources from the FHIR test bed, the official
MCP client. Each test names the obligation it shows and proves it both ways where it can.
"""

from __future__ import annotations

import datetime as dt

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, sidecar_config

pytestmark = pytest.mark.integration

BREAK_GLASS = "Unconscious patient in ED; need full history."


def clinician(**claims_and_scopes):
    ident = {**CLINICIAN, "claims": {**CLINICIAN["claims"], **claims_and_scopes.pop("claims", {})}}
    ident.update(claims_and_scopes)
    return ident


async def call(tmp_path, fhir_server, tool, args, identity=None):
    settings = config.from_mapping(
        sidecar_config(tmp_path, fhir_server.base_url, identity=identity or CLINICIAN)
    )
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


def security_codes(resource):
    return {c.get("code") for c in (resource.get("meta") or {}).get("security", [])}


async def test_a_psy_labelled_note_is_absent_from_a_discharge_summary_search_and_present_under_break_glass(
    tmp_path, fhir_server
):
    args = {"patient_id": data.AU_PATIENT_ID, "purpose": "discharge_summary"}
    normal = await call(tmp_path / "a", fhir_server, "list_documents", args)
    assert data.PSY_NOTE_ID not in {r["id"] for r in normal["resources"]}
    assert normal["withheld"]["security_label"] >= 1
    glass = await call(
        tmp_path / "b",
        fhir_server,
        "list_documents",
        {**args, "purpose": "treatment", "break_glass_reason": BREAK_GLASS},
    )
    assert data.PSY_NOTE_ID in {r["id"] for r in glass["resources"]}


async def test_excluded_security_labels_never_reach_the_agent_without_break_glass(tmp_path, fhir_server):
    body = await call(
        tmp_path, fhir_server, "search_conditions", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
    )
    assert body["withheld"]["security_label"] >= 1
    for resource in body["resources"]:
        assert not security_codes(resource) & {"PSY", "HIV", "ETH", "SDV", "R", "V"}


async def test_allowed_categories_keep_only_labs_and_vitals_for_a_discharge_summary(tmp_path, fhir_server):
    body = await call(
        tmp_path,
        fhir_server,
        "search_observations",
        {"patient_id": data.SERIES_PATIENT_ID, "purpose": "discharge_summary", "page_size": 100},
    )
    assert body["count"] > 0
    for resource in body["resources"]:
        cats = {c["code"] for cat in resource.get("category", []) for c in cat.get("coding", [])}
        assert cats & {"laboratory", "vital-signs"}


async def test_a_v2_scope_with_a_category_narrows_observations_to_that_category(tmp_path, fhir_server):
    narrowed = clinician(scopes=["user/Observation.rs?category=laboratory", "user/Patient.rs"])
    body = await call(
        tmp_path,
        fhir_server,
        "search_observations",
        {"patient_id": data.SERIES_PATIENT_ID, "purpose": "treatment", "page_size": 100},
        identity=narrowed,
    )
    assert body["count"] > 0
    for resource in body["resources"]:
        cats = {c["code"] for cat in resource.get("category", []) for c in cat.get("coding", [])}
        assert cats == {"laboratory"}


async def test_max_lookback_days_drops_observations_older_than_the_discharge_window(tmp_path, fhir_server):
    body = await call(
        tmp_path,
        fhir_server,
        "search_observations",
        {"patient_id": data.SERIES_PATIENT_ID, "purpose": "discharge_summary", "page_size": 100},
    )
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    dates = [
        dt.datetime.fromisoformat(r["effectiveDateTime"].replace("Z", "+00:00")) for r in body["resources"]
    ]
    assert dates, "the series patient has observations in the last 30 days"
    assert min(dates) >= cutoff
    everything = await call(
        tmp_path / "t",
        fhir_server,
        "search_observations",
        {"patient_id": data.SERIES_PATIENT_ID, "purpose": "treatment", "page_size": 100},
    )
    assert any(
        dt.datetime.fromisoformat(r["effectiveDateTime"].replace("Z", "+00:00")) < cutoff
        for r in everything["resources"]
    )


async def test_redact_removes_patient_contact_details_for_medication_reconciliation(tmp_path, fhir_server):
    body = await call(
        tmp_path,
        fhir_server,
        "read_patient",
        {"patient_id": data.AU_PATIENT_ID, "purpose": "medication_reconciliation"},
    )
    [patient] = body["resources"]
    assert "telecom" not in patient and "address" not in patient
    assert body["withheld"]["redacted_elements"] >= 1
    unredacted = await call(
        tmp_path / "t",
        fhir_server,
        "read_patient",
        {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"},
    )
    assert "telecom" in unredacted["resources"][0]


async def test_max_results_caps_the_page_whatever_the_agent_asks_for(tmp_path, fhir_server):
    body = await call(
        tmp_path,
        fhir_server,
        "search_observations",
        {"patient_id": data.SERIES_PATIENT_ID, "purpose": "treatment", "page_size": 100},
    )
    assert body["count"] <= 100
    assert body.get("continuation"), "the series patient has more than one page"
