"""AU GP profile tests. Samples: SOURCES.md §5 (au-fhir-test-data Patient-bassett-imogene-betsy.json)."""

from __future__ import annotations

import json

import pytest
from fhir.resources.R4B.patient import Patient

from mcp_fhir.ehr.profiles import get_profile
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES


def _patient() -> dict:
    return json.loads((SAMPLES / "au_core_patient_ihi_medicare_dva.json").read_text())


@pytest.mark.parametrize("name", ["au_gp", "best_practice", "medical_director", "genie"])
def test_au_core_patient_identifiers_are_lifted(name: str) -> None:
    # Source: hl7au/au-fhir-test-data @7da33786 Patient-bassett-imogene-betsy.json
    result = get_profile(name).normalise(_patient())
    assert result.extras["ihi"] == "8003608000311696"
    assert result.extras["medicare_number"] == "69518257911"
    assert result.extras["dva_number"] == "QX144963"
    assert result.extras["gp_id"] == "bassett-imogene-betsy"
    assert "identifier_warnings" not in result.extras
    Patient.model_validate(result.resource)


def test_invalid_au_identifiers_are_warned_about_never_dropped() -> None:
    patient = _patient()
    patient["identifier"][0]["value"] = "8003608000311697"  # Luhn broken
    patient["identifier"][1]["value"] = "6951449677"  # fails the Medicare check digit (au-fhir-test-data)
    result = get_profile("au_gp").normalise(patient)
    assert "ihi" not in result.extras
    assert "medicare_number" not in result.extras
    assert [(w["path"], w["kind"]) for w in result.extras["identifier_warnings"]] == [
        ("Patient.identifier[0]", "ihi"),
        ("Patient.identifier[1]", "medicare_number"),
    ]
    assert "8003608000311697" not in json.dumps(result.extras)  # warnings carry no value (PHI)
    assert result.resource["identifier"][0]["value"] == "8003608000311697"


def test_provider_identifiers_are_recognised() -> None:
    practitioner = {
        "resourceType": "Practitioner",
        "identifier": [
            {"system": "http://ns.electronichealth.net.au/id/hi/hpii/1.0", "value": "8003619900015717"},
        ],
    }
    organization = {
        "resourceType": "Organization",
        "identifier": [
            {"system": "http://ns.electronichealth.net.au/id/hi/hpio/1.0", "value": "8003621566684455"}
        ],
    }
    assert get_profile("au_gp").normalise(practitioner).extras["hpii"] == "8003619900015717"
    assert get_profile("au_gp").normalise(organization).extras["hpio"] == "8003621566684455"


def test_au_gp_aliases_differ_only_by_name() -> None:
    base = get_profile("au_gp")
    for name in ("best_practice", "medical_director", "genie"):
        alias = get_profile(name)
        assert alias.name == name
        assert alias.supports_hl7v2_results and alias.fhir_version == base.fhir_version
