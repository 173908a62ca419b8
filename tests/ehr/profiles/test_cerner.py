"""Oracle Health / Cerner profile golden tests (samples: SOURCES.md §2, cerner/fhir.cerner.com @3d33831a)."""

from __future__ import annotations

import json

import pytest
from fhir.resources.R4B import get_fhir_model_class

from mcp_fhir._exceptions import InvalidArgument
from mcp_fhir.ehr.profiles import get_profile
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES
CERNER = get_profile("cerner")


def _load(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text())


def test_cerner_patient_lifts_the_current_mrn_and_ids() -> None:
    # Source: r4_examples_patient.rb R4_PATIENT_ENTRY (two MRNs, one ended in 2020)
    result = CERNER.normalise(_load("cerner_r4_patient.json"))
    assert result.extras["mrn"] == "6931"
    assert result.extras["cerner_id"] == "12724067"
    assert result.extras["last_updated"] == "2020-07-06T21:21:22.000Z"
    assert result.extras["federated_principal"].startswith("URN:CERNER:IDENTITY-FEDERATION")
    get_fhir_model_class("Patient").model_validate(result.resource)


def test_cerner_patient_extensions_are_lifted() -> None:
    # Source: r4_examples_patient.rb R4_PATIENT_ENTRY
    extras = CERNER.normalise(_load("cerner_r4_patient.json")).extras
    assert extras["race"]["codes"] == ["2106-3"]
    assert extras["ethnicity"]["codes"] == ["2186-5"]
    assert extras["communication_preferences"][0]["verified_datetime"] == "2019-04-13T20:00:00.000Z"


def test_cerner_lab_observation_reports_its_data_absent_category() -> None:
    # Source: r4_examples_observation.rb R4_OBSERVATION_BUNDLE entry L-206310347
    result = CERNER.normalise(_load("cerner_r4_observation_lab.json"))
    assert result.extras["category_data_absent"] == "unknown"
    assert result.extras["ceuuid"].startswith("CE87caf4b7")
    assert result.resource["valueQuantity"] == {"value": 181, "unit": "mg/dL"}
    get_fhir_model_class("Observation").model_validate(result.resource)


def test_cerner_conditions_in_a_search_bundle_normalise_and_validate() -> None:
    # Source: r4_examples_condition.rb R4_CONDITION_BUNDLE
    bundle = _load("cerner_r4_condition_search_bundle.json")
    for entry in bundle["entry"]:
        result = CERNER.normalise(entry["resource"])
        assert result.extras["cerner_id"] == entry["resource"]["id"]
        get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(result.resource)


def test_the_cerner_bundle_self_link_query_passes_the_patient_check() -> None:
    # Source: r4_examples_condition.rb R4_CONDITION_BUNDLE self link: Condition?patient=12724066
    CERNER.check_query("Condition", {"patient": "12724066"})
    with pytest.raises(InvalidArgument):
        CERNER.check_query("Condition", {"clinical-status": "active"})
