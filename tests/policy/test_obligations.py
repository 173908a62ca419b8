"""Example-based obligation enforcement (the property tests live in tests/adversarial/test_properties.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from mcp_fhir.policy.engine import Obligations
from mcp_fhir.policy.obligations import clinical_date, enforce, parse_fhir_datetime, redact, security_codes
from tests.data import VENDOR_SAMPLES

VENDOR = VENDOR_SAMPLES
NOW = datetime(2026, 6, 1, tzinfo=UTC)
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def _obs(rid: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "effectiveDateTime": "2026-05-30", **extra}


def test_a_label_is_matched_bare_and_as_system_and_code():
    labelled = _obs("o", meta={"security": [{"system": ACT, "code": "HIV"}]})
    assert enforce([labelled], Obligations(exclude_security_labels=frozenset({"HIV"}))).withheld_label == 1
    by_system = Obligations(exclude_security_labels=frozenset({f"{ACT}|HIV"}))
    assert enforce([labelled], by_system).withheld_label == 1


def test_a_real_restricted_observation_is_withheld_by_its_confidentiality_label():
    # Source: HL7 DS4P IG example (vendor-samples/ds4p_observation_meta_security_R_with_basis.json).
    sample = json.loads(
        (VENDOR / "ds4p_observation_meta_security_R_with_basis.json").read_text(encoding="utf-8")
    )
    assert "R" in security_codes(sample)
    out = enforce([sample], Obligations(exclude_security_labels=frozenset({"R"})), now=NOW)
    assert (out.resources, out.withheld_label) == ([], 1)


def test_a_category_restriction_keeps_only_listed_categories_and_drops_uncategorised_resources():
    lab = _obs("lab", category=[{"coding": [{"code": "laboratory"}]}])
    single = _obs("single", category={"coding": [{"code": "laboratory"}]})
    social = _obs("social", category=[{"coding": [{"code": "social-history"}]}])
    none = _obs("none")
    ob = Obligations(allowed_categories={"Observation": frozenset({"laboratory"})})
    out = enforce([lab, single, social, none], ob, now=NOW)
    assert [r["id"] for r in out.resources] == ["lab", "single"]
    assert out.withheld_category == 2


def test_a_category_restriction_on_another_type_leaves_this_type_alone():
    ob = Obligations(allowed_categories={"Condition": frozenset({"problem-list-item"})})
    assert len(enforce([_obs("o")], ob, now=NOW).resources) == 1


def test_a_lookback_drops_old_and_undated_resources_but_never_the_patient():
    old = _obs("old", effectiveDateTime="2020-01-01")
    undated = {"resourceType": "Observation", "id": "undated"}
    patient = {"resourceType": "Patient", "id": "p"}
    out = enforce([_obs("new"), old, undated, patient], Obligations(max_lookback_days=30), now=NOW)
    assert [r["id"] for r in out.resources] == ["new", "p"]
    assert out.withheld_lookback == 2


def test_partial_and_zoned_dates_are_read_as_their_earliest_utc_instant():
    assert parse_fhir_datetime("2026") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_fhir_datetime("2026-05") == datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_fhir_datetime("2026-05-01T10:00:00+10:00") == datetime(2026, 5, 1, 0, tzinfo=UTC)
    assert parse_fhir_datetime("not a date") is None
    period = {"resourceType": "Encounter", "period": {"start": "2026-05-02"}}
    assert clinical_date(period) == datetime(2026, 5, 2, tzinfo=UTC)


def test_redaction_removes_nested_and_listed_elements_and_counts_them():
    patient = {
        "resourceType": "Patient",
        "id": "p",
        "address": [{"line": ["1 Main St"]}],
        "contact": [
            {"telecom": [{"value": "0400"}]},
            {"telecom": [{"value": "0411"}], "name": {"text": "x"}},
        ],
    }
    removed = redact(patient, ["Patient.address", "Patient.contact.telecom", "Observation.note"])
    assert removed == 3
    assert patient == {"resourceType": "Patient", "id": "p", "contact": [{}, {"name": {"text": "x"}}]}


def test_a_wildcard_redaction_applies_to_every_type():
    obs = _obs("o", text={"div": "<div>x</div>"})
    assert redact(obs, ["*.text"]) == 1 and "text" not in obs


def test_max_results_zero_returns_nothing_and_counts_the_truncation():
    out = enforce([_obs("a"), _obs("b")], Obligations(max_results=0), now=NOW)
    assert (out.resources, out.truncated, out.filtered) == ([], 2, 2)


def test_enforcement_returns_copies_and_leaves_the_cached_input_untouched():
    source = _obs("o", note=[{"text": "n"}])
    out = enforce([source], Obligations(redact=("Observation.note",)), now=NOW)
    assert "note" in source and "note" not in out.resources[0]
    out.resources[0]["id"] = "changed"
    assert source["id"] == "o"


def test_no_obligations_keep_everything_as_it_was():
    resources = [_obs("a", meta={"security": [{"code": "PSY"}]}), _obs("b", effectiveDateTime="1990-01-01")]
    out = enforce(resources, Obligations(), now=NOW)
    assert out.resources == resources and out.filtered == 0


def test_the_lookback_boundary_is_inclusive():
    exactly = _obs("edge", effectiveDateTime=(NOW - timedelta(days=30)).isoformat())
    assert len(enforce([exactly], Obligations(max_lookback_days=30), now=NOW).resources) == 1
