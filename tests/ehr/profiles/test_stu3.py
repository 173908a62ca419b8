"""STU3 → R4 golden tests. Samples: SOURCES.md §3 (HL7 spec examples, fhir_stu3_models @61fb069b
and their R4 twins from fhir_models @d5a09480) and §1 (Epic STU3 MedicationStatement, interop-ehr)."""

from __future__ import annotations

import json

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given
from hypothesis import strategies as st

from mcp_fhir._exceptions import UpstreamBadResponse
from mcp_fhir.ehr.profiles import get_profile
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES
STU3 = get_profile("stu3")


def _load(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text())


def _valid_r4(resource: dict) -> None:
    # fhir.resources 8 defaults to R5; R4B is close enough to R4 for these resource types.
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


KEYS = {
    "condition": ["clinicalStatus", "verificationStatus", "category", "code", "subject", "onsetDateTime"],
    "observation_lab_glucose": [
        "status",
        "code",
        "valueQuantity",
        "interpretation",
        "referenceRange",
        "issued",
    ],
    "observation_bodyweight": ["status", "category", "code", "subject", "valueQuantity"],
    "medicationstatement": ["status", "category", "medicationReference", "reasonCode", "effectiveDateTime"],
    "patient": ["identifier", "name", "gender", "birthDate", "address"],
}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_stu3_spec_example_matches_its_r4_twin_on_key_fields(name: str) -> None:
    # Source: HL7 FHIR STU3 example pack vs the R4 example pack (same example in both versions)
    result = STU3.normalise(_load(f"stu3_{name}.json"))
    twin = _load(f"r4_{name}.json")
    for key in KEYS[name]:
        assert result.resource.get(key) == twin.get(key), key
    _valid_r4(result.resource)
    assert result.extras["source_fhir_version"] == "3.0.2"


def test_stu3_condition_status_codes_become_r4_concepts() -> None:
    # Source: STU3 condition-example.json
    resource = STU3.normalise(_load("stu3_condition.json")).resource
    assert resource["clinicalStatus"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
        "code": "active",
    }
    assert resource["verificationStatus"]["coding"][0]["system"].endswith("/condition-ver-status")


def test_stu3_condition_asserted_date_and_abatement_boolean() -> None:
    condition = _load("stu3_condition.json") | {
        "assertedDate": "2012-06-01",
        "abatementBoolean": True,
        "verificationStatus": "unknown",
        "context": {"reference": "Encounter/e1"},
    }
    result = STU3.normalise(condition)
    assert {
        "url": "http://hl7.org/fhir/StructureDefinition/condition-assertedDate",
        "valueDateTime": "2012-06-01",
    } in (result.resource["extension"])
    assert "abatementBoolean" not in result.resource
    assert "verificationStatus" not in result.resource
    assert result.resource["encounter"] == {"reference": "Encounter/e1"}
    assert set(result.unmapped) == {"Condition.abatementBoolean", "Condition.verificationStatus"}
    assert result.extras["abatement_boolean"] is True
    _valid_r4(result.resource)


def test_stu3_medication_statement_drops_taken_and_says_so() -> None:
    # Source: STU3 medicationstatementexample1.json
    result = STU3.normalise(_load("stu3_medicationstatement.json"))
    assert "taken" not in result.resource
    assert "MedicationStatement.taken" in result.unmapped
    assert "Medication.isBrand" in result.unmapped
    assert result.extras["stu3_taken"] == "n"
    twin = _load("r4_medicationstatement.json")
    assert result.resource["contained"][0]["ingredient"] == twin["contained"][0]["ingredient"]
    assert result.resource["contained"][0]["batch"] == twin["contained"][0]["batch"]
    assert (
        result.resource["dosage"][0]["doseAndRate"][0]["doseRange"]
        == twin["dosage"][0]["doseAndRate"][0]["doseRange"]
    )


def test_epic_stu3_medication_statement_maps_reason_not_taken_to_status_reason() -> None:
    # Source: interop-ehr STU3MedicationStatementBundle.json (Providence Epic STU3), trimmed to 1 entry
    resource = _load("epic_stu3_medicationstatement_bundle.json")["entry"][0]["resource"]
    result = STU3.normalise(resource)
    assert result.resource["statusReason"][0]["coding"][0]["code"] == "182872003"
    assert result.resource["dosage"][0]["doseAndRate"] == [
        {"doseQuantity": {"value": 325, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}
    ]
    assert result.resource["category"]["coding"][0]["system"] == (
        "http://terminology.hl7.org/CodeSystem/medication-statement-category"
    )
    assert result.unmapped == ["MedicationStatement.taken"]
    _valid_r4(result.resource)


def test_stu3_observation_context_comment_and_related_are_converted() -> None:
    observation = _load("stu3_observation_lab_glucose.json") | {
        "context": {"reference": "Encounter/e1"},
        "comment": "haemolysed",
        "related": [
            {"type": "derived-from", "target": {"reference": "Observation/o2"}},
            {"type": "replaces"},
        ],
    }
    result = STU3.normalise(observation)
    assert result.resource["encounter"] == {"reference": "Encounter/e1"}
    assert result.resource["note"] == [{"text": "haemolysed"}]
    assert result.resource["derivedFrom"] == [{"reference": "Observation/o2"}]
    assert result.unmapped == ["Observation.related"]
    _valid_r4(result.resource)


def test_stu3_allergy_intolerance_is_converted() -> None:
    allergy = {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": "active",
        "verificationStatus": "confirmed",
        "type": "allergy",
        "assertedDate": "2014-10-09T14:58:00+11:00",
        "patient": {"reference": "Patient/example"},
        "reaction": [{"certainty": "likely", "manifestation": [{"text": "hives"}]}],
    }
    result = STU3.normalise(allergy)
    assert result.resource["clinicalStatus"]["coding"][0]["system"].endswith("/allergyintolerance-clinical")
    assert result.resource["verificationStatus"]["coding"][0]["system"].endswith(
        "/allergyintolerance-verification"
    )
    assert result.resource["recordedDate"] == "2014-10-09T14:58:00+11:00"
    assert result.unmapped == ["AllergyIntolerance.reaction.certainty"]
    _valid_r4(result.resource)


def test_stu3_procedure_not_done_becomes_status_not_done() -> None:
    procedure = {
        "resourceType": "Procedure",
        "status": "suspended",
        "notDone": True,
        "notDoneReason": {"text": "patient declined"},
        "subject": {"reference": "Patient/example"},
        "performer": [{"role": {"text": "surgeon"}, "actor": {"reference": "Practitioner/p1"}}],
    }
    result = STU3.normalise(procedure)
    assert result.resource["status"] == "not-done"
    assert result.resource["statusReason"] == {"text": "patient declined"}
    assert result.resource["performer"][0]["function"] == {"text": "surgeon"}
    _valid_r4(result.resource)


def test_stu3_medication_request_requester_and_category() -> None:
    request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "aspirin"},
        "subject": {"reference": "Patient/example"},
        "context": {"reference": "Encounter/e1"},
        "category": {
            "coding": [{"system": "http://hl7.org/fhir/medication-request-category", "code": "outpatient"}]
        },
        "requester": {
            "agent": {"reference": "Practitioner/p1"},
            "onBehalfOf": {"reference": "Organization/o1"},
        },
        "dosageInstruction": [{"text": "daily", "doseQuantity": {"value": 1}}],
        "substitution": {"allowed": False},
    }
    result = STU3.normalise(request)
    assert result.resource["requester"] == {"reference": "Practitioner/p1"}
    assert result.resource["encounter"] == {"reference": "Encounter/e1"}
    assert result.resource["category"][0]["coding"][0]["system"].endswith("/medicationrequest-category")
    assert result.resource["substitution"] == {"allowedBoolean": False}
    assert result.unmapped == ["MedicationRequest.requester.onBehalfOf"]
    _valid_r4(result.resource)


def test_stu3_encounter_keeps_class_and_renames_reason() -> None:
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://hl7.org/fhir/v3/ActCode", "code": "AMB"},
        "reason": [{"text": "checkup"}],
        "diagnosis": [{"condition": {"reference": "Condition/c1"}, "role": {"text": "AD"}}],
    }
    result = STU3.normalise(encounter)
    assert result.resource["class"] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "AMB",
    }
    assert result.resource["reasonCode"] == [{"text": "checkup"}]
    assert result.resource["diagnosis"][0]["use"] == {"text": "AD"}
    _valid_r4(result.resource)


def test_stu3_document_reference_is_converted() -> None:
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"text": "Discharge summary"},
        "class": {"text": "summary"},
        "indexed": "2005-12-24T09:43:41+11:00",
        "created": "2005-12-24T09:35:00+11:00",
        "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/1"}}],
        "context": {
            "encounter": {"reference": "Encounter/e1"},
            "related": [{"ref": {"reference": "Patient/xcda"}}],
        },
    }
    result = STU3.normalise(document)
    assert result.resource["category"] == [{"text": "summary"}]
    assert result.resource["date"] == "2005-12-24T09:43:41+11:00"
    assert result.resource["extension"][0]["valueDateTime"] == "2005-12-24T09:35:00+11:00"
    assert result.resource["context"]["encounter"] == [{"reference": "Encounter/e1"}]
    assert result.resource["context"]["related"] == [{"reference": "Patient/xcda"}]
    _valid_r4(result.resource)


def test_stu3_type_without_a_map_is_passed_through_and_flagged() -> None:
    result = STU3.normalise({"resourceType": "Immunization", "status": "completed"})
    assert result.unmapped == ["Immunization"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)
_KEYS = st.sampled_from(
    [
        "context",
        "interpretation",
        "related",
        "comment",
        "clinicalStatus",
        "verificationStatus",
        "stage",
        "requester",
        "category",
        "dosage",
        "dosageInstruction",
        "substitution",
        "reason",
        "diagnosis",
        "performer",
        "notDone",
        "class",
        "context",
        "contained",
        "ingredient",
        "package",
        "reaction",
        "component",
        "taken",
    ]
)


@given(
    st.sampled_from(
        [
            "Patient",
            "Observation",
            "Condition",
            "AllergyIntolerance",
            "MedicationStatement",
            "MedicationRequest",
            "Encounter",
            "Procedure",
            "DocumentReference",
            "Medication",
        ]
    ),
    st.dictionaries(_KEYS, _JSON, max_size=6),
)
def test_stu3_elements_of_any_shape_give_a_result_or_a_typed_error(rtype: str, body: dict) -> None:
    try:
        result = STU3.normalise({**body, "resourceType": rtype})
    except UpstreamBadResponse:
        return
    assert result.resource["resourceType"] == rtype
