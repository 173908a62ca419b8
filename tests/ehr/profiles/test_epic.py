"""Epic profile golden tests (samples: SOURCES.md §1, The-Ronin-Project interop-ehr / interop-mock-ehr)."""

from __future__ import annotations

import copy
import json

from fhir.resources.R4B import get_fhir_model_class

from mcp_fhir.ehr.profiles import get_profile
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES
EPIC = get_profile("epic")


def _load(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text())


def _valid_r4(resource: dict) -> None:
    # fhir.resources 8 defaults to R5; R4B is the closest model set to R4 for these types.
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_epic_patient_splits_mrn_from_the_epic_fhir_id() -> None:
    # Source: interop-ehr ExamplePatientBundle.json entry[0] (Epic App Orchard sandbox)
    result = EPIC.normalise(_load("epic_r4_patient.json"))
    assert result.extras["mrn"] == "202497"
    assert result.extras["epic_fhir_id"] == "eJzlzKe3KPzAV5TtkxmNivQ3"
    assert result.extras["mrn"] != result.extras["epic_fhir_id"]
    _valid_r4(result.resource)


def test_epic_patient_extensions_are_lifted() -> None:
    # Source: interop-ehr ExamplePatientBundle.json entry[0]
    extras = EPIC.normalise(_load("epic_r4_patient.json")).extras
    assert extras["legal_sex"] == "female"
    assert extras["birth_sex"] == "F"
    assert extras["gender_identity"] == "transgender-female"
    assert extras["race"] == {"codes": ["UNK"], "text": "Unknown"}
    assert extras["ethnicity"] == {"codes": [], "text": "Unknown"}


def test_epic_patients_in_a_search_bundle_normalise_like_the_single_read() -> None:
    # Source: interop-ehr ExamplePatientBundle.json (with a trailing OperationOutcome entry)
    bundle = _load("epic_r4_patient_search_bundle_with_operationoutcome.json")
    patients = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert [EPIC.normalise(p).extras["mrn"] for p in patients] == ["202497"]


def test_epic_mrn_is_found_by_oid_when_type_text_is_missing() -> None:
    patient = _load("epic_r4_patient.json")
    for identifier in patient["identifier"]:
        identifier.pop("type", None)
    assert EPIC.normalise(patient).extras["mrn"] == "202497"


def test_epic_mrn_prefers_the_current_identifier_over_an_ended_one() -> None:
    patient = _load("epic_r4_patient.json")
    old = copy.deepcopy(patient["identifier"][1])
    old["value"], old["period"] = "OLD1", {"end": "2019-01-01"}
    patient["identifier"].insert(0, old)
    assert EPIC.normalise(patient).extras["mrn"] == "202497"


def test_epic_patient_without_extensions_has_no_extension_fields_and_no_error() -> None:
    patient = _load("epic_r4_patient.json")
    del patient["extension"]
    extras = EPIC.normalise(patient).extras
    assert not {"legal_sex", "birth_sex", "race", "ethnicity", "gender_identity"} & set(extras)
    assert extras["mrn"] == "202497"


def test_epic_patient_with_malformed_extensions_does_not_raise() -> None:
    patient = _load("epic_r4_patient.json")
    patient["extension"] = [
        None,
        {"url": "http://open.epic.com/FHIR/StructureDefinition/extension/legal-sex"},
        3,
    ]
    patient["identifier"] = [None, {"type": "MRN"}]
    assert "legal_sex" not in EPIC.normalise(patient).extras


def test_epic_lab_observation_keeps_customer_oid_codes_and_lifts_the_component_id() -> None:
    # Source: interop-mock-ehr Observation_lab_reference_range_UhKX.json (Epic customer OIDs)
    result = EPIC.normalise(_load("epic_r4_observation_lab_customer_oids.json"))
    assert result.extras["epic_component_id"] == "68"
    assert result.resource["valueQuantity"]["value"] == 95
    assert result.unmapped == []
    _valid_r4(result.resource)


def test_epic_medication_request_is_valid_r4() -> None:
    # Source: interop-ehr ExampleMedicationRequestById.json
    result = EPIC.normalise(_load("epic_r4_medicationrequest.json"))
    assert result.extras["epic_fhir_id"] == result.resource["id"]
    _valid_r4(result.resource)
