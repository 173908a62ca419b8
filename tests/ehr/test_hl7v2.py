"""HL7 v2 ORU^R01 → R4 Observation golden tests. Samples: SOURCES.md §4."""

from __future__ import annotations

import pytest
from fhir.resources.R4B.observation import Observation
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_fhir._exceptions import ConfigError, InvalidArgument, MCPFhirError
from mcp_fhir.ehr.hl7v2 import parse_oru_r01, parse_oru_r01_message
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES
LOINC = "http://loinc.org"


def _read(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _by_code(observations: list[dict], code: str) -> dict:
    return next(o for o in observations if any(c["code"] == code for c in o["code"].get("coding", [])))


def _validate_all(observations: list[dict]) -> None:
    for observation in observations:
        Observation.model_validate(observation)  # fhir.resources R4B model


def test_au_pathology_egfr_troponin_and_fbc_are_mapped() -> None:
    # Source: angusmillar/PeterPiper @6db8c68d TestSetOfMsg.dat, 2nd ORU^R01 (QLD SUPERLIS)
    result = parse_oru_r01_message(
        _read("oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"), default_timezone="Australia/Brisbane"
    )
    obs = result.observations
    assert len(obs) == 33
    assert result.control_id == "000000000000004ZJY1O"

    egfr = _by_code(obs, "33914-3")
    assert egfr["code"]["coding"][0]["system"] == LOINC
    assert egfr["valueQuantity"] == {"value": 18, "unit": "mL/min/1.73m^2"}
    assert egfr["referenceRange"] == [{"low": {"value": 60, "unit": "mL/min/1.73m^2"}, "text": "> 60"}]
    assert egfr["interpretation"][0]["coding"][0]["code"] == "L"
    assert egfr["effectiveDateTime"] == "2014-03-02T23:23:00+10:00"
    assert egfr["status"] == "final"

    troponin = _by_code(obs, "TNIBEC")
    assert troponin["code"]["coding"][0]["system"] == "urn:mcp-fhir:hl7v2:cs:SUPERLIS"
    assert troponin["valueQuantity"] == {"value": 0.041, "unit": "ug/L"}
    assert troponin["referenceRange"][0]["high"] == {"value": 0.04, "unit": "ug/L"}
    assert troponin["interpretation"][0]["coding"][0]["code"] == "H"

    haemoglobin = _by_code(obs, "14775-1")
    assert haemoglobin["valueQuantity"] == {"value": 117, "unit": "g/L"}
    assert haemoglobin["referenceRange"][0]["low"]["value"] == 120
    assert haemoglobin["referenceRange"][0]["high"]["value"] == 180
    platelets = _by_code(obs, "PLT")
    assert platelets["valueQuantity"] == {"value": 157, "unit": "x 10^9/L"}
    # "PLT^...^LN" is labelled LN but is not a LOINC code: it must not be presented as LOINC.
    assert platelets["code"]["coding"][0]["system"] != LOINC

    fasting_note = _by_code(obs, "GLUFA")
    assert fasting_note["valueString"] == "-->"
    _validate_all(obs)


def test_au_pathology_subject_is_the_mrn_and_all_pid_identifiers_are_returned() -> None:
    # Source: angusmillar/PeterPiper TestSetOfMsg.dat (PID-3 123456^^^PCH^MR~1234567890^^^AUSHIC^MC)
    result = parse_oru_r01_message(_read("oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"))
    assert [i["value"] for i in result.patient_identifiers] == ["123456", "1234567890"]
    assert result.patient_identifiers[1]["system"] == "http://ns.electronichealth.net.au/id/medicare-number"
    subject = result.observations[0]["subject"]["identifier"]
    assert subject["value"] == "123456"
    assert subject["type"]["coding"][0]["code"] == "MR"


def test_hl7_provenance_is_recorded_in_meta() -> None:
    # Source: angusmillar/PeterPiper TestSetOfMsg.dat (MSH-10 000000000000004ZJY1O)
    observation = parse_oru_r01(_read("oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"))[0]
    assert observation["meta"]["source"].endswith("000000000000004ZJY1O")
    assert observation["meta"]["tag"][0]["code"] == "hl7v2-oru-r01"
    assert observation["category"][0]["coding"][0]["code"] == "laboratory"


def test_without_a_known_timezone_only_the_date_is_kept() -> None:
    # Source: angusmillar/PeterPiper TestSetOfMsg.dat (timestamps carry no offset, MSH-7 neither)
    observation = parse_oru_r01(_read("oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"))[0]
    assert observation["effectiveDateTime"] == "2014-03-02"
    assert "issued" not in observation


def test_nist_lead_result_uses_ucum_and_the_timestamp_offset() -> None:
    # Source: MatthewVita/node-hl7-complete @8932730a NIST ORU_R01_2.5.1_SampleTestCase1.hl7
    result = parse_oru_r01_message(_read("oru_r01_nist_elr_2.5.1_lead.hl7"))
    (lead,) = result.observations
    assert lead["code"]["coding"] == [{"system": LOINC, "code": "10368-9", "display": "Lead BldC-mCnc"}]
    assert lead["valueQuantity"] == {
        "value": 50,
        "unit": "ug/dL",
        "system": "http://unitsofmeasure.org",
        "code": "ug/dL",
    }
    assert lead["effectiveDateTime"] == "2008-08-15T10:30:00-07:00"
    assert lead["issued"] == "2008-08-18T18:00:00-07:00"
    assert lead["interpretation"][0]["coding"][0]["code"] == "H"
    assert lead["referenceRange"] == [{"text": "<9 mcg/dL:  Acceptable background lead exposure"}]
    assert lead["subject"]["identifier"]["system"] == "urn:oid:2.16.840.1.113883.19.3.2.1"
    assert lead["subject"]["identifier"]["value"] == "9817566735"
    _validate_all(result.observations)


def test_cerner_microbiology_coded_result_becomes_a_codeable_concept() -> None:
    # Source: MatthewVita/node-hl7-complete test-data/valid/cerner/cerner_bordetella.hl7
    (culture,) = parse_oru_r01(_read("oru_r01_cerner_microbiology.hl7"), default_timezone="America/Denver")
    assert culture["code"]["coding"][0] == {"system": LOINC, "code": "548-8", "display": "Culture Sputum"}
    assert culture["valueCodeableConcept"] == {"text": "Bordetella pertussis"}
    assert culture["interpretation"][0]["coding"][0]["code"] == "A"
    assert culture["effectiveDateTime"] == "2010-11-04T16:40:00-06:00"
    assert culture["subject"]["identifier"]["value"] == "9339683996"
    _validate_all([culture])


def test_hl7_spec_glucose_structured_numeric_and_unsupported_type() -> None:
    # Source: johnpaulett/python-hl7 @e41436ac tests/samples.py sample_hl7 (HL7 normative example)
    sn, fn = parse_oru_r01(_read("oru_r01_hl7_spec_glucose_python-hl7.hl7"))
    assert sn["valueQuantity"] == {"value": 182, "unit": "mg/dl"}
    assert sn["referenceRange"][0]["low"]["value"] == 70
    assert sn["referenceRange"][0]["high"]["value"] == 105
    assert sn["code"]["coding"][0]["code"] == "1554-5"
    # OBX-2 "FN" is not an observation value type: said, not guessed.
    assert fn["dataAbsentReason"]["coding"][0]["code"] == "unsupported"
    assert "valueQuantity" not in fn
    _validate_all([sn, fn])


def test_structured_numeric_ranges_and_statuses() -> None:
    message = (
        "MSH|^~\\&|LAB|FAC|EHR|FAC|20240101120000+1000||ORU^R01|C1|P|2.5.1\r"
        "PID|1||8003608833357361^^^AUSHICPR^NI\r"
        "OBR|1|||X^X^L|||20240101110000\r"
        "OBX|1|SN|A^A^L||^10^-^20|mg|||||P\r"
        "OBX|2|SN|B^B^L||<^5|mg|||||C\r"
        "OBX|3|NM|C^C^L||>1000|mg|||||X\r"
        "OBX|4|TX|D^D^L||line one~line two||||||F\r"
        "OBX|5|CWE|E^E^L||260373001^Detected^SCT||||||D\r"
    )
    a, b, c, d, e = parse_oru_r01(message)
    assert a["valueRange"] == {"low": {"value": 10, "unit": "mg"}, "high": {"value": 20, "unit": "mg"}}
    assert a["status"] == "preliminary"
    assert b["valueQuantity"] == {"value": 5, "unit": "mg", "comparator": "<"}
    assert b["status"] == "corrected"
    assert c["valueQuantity"]["comparator"] == ">"
    assert c["status"] == "cancelled"
    assert d["valueString"] == "line one\nline two"
    assert e["valueCodeableConcept"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "260373001",
        "display": "Detected",
    }
    assert e["status"] == "entered-in-error"
    assert a["effectiveDateTime"] == "2024-01-01T11:00:00+10:00"  # MSH-7 offset applies to the message
    assert a["subject"]["identifier"]["system"] == "http://ns.electronichealth.net.au/id/hi/ihi/1.0"
    _validate_all([a, b, c, d, e])


def test_a_message_hl7apy_rejects_is_read_permissively() -> None:
    message = (
        "MSH|^~\\&|LAB|FAC|||20240101||ORU^R01|C2|P|9.9\rPID|1||42^^^X^MR\rOBX|1|NM|2339-0^Glu^LN||5.5|mmol/L"
    )
    (observation,) = parse_oru_r01(message)
    assert observation["valueQuantity"]["value"] == 5.5
    assert observation["code"]["coding"][0]["system"] == LOINC


@pytest.mark.parametrize(
    "message",
    ["", "hello", b"\x00\x01", "PID|1||42", "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1", "MSH|"],
)
def test_bad_input_is_an_invalid_argument(message: str | bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_oru_r01(message)
    assert info.value.code == "invalid_argument"
    assert info.value.argument == "message"


def test_unknown_timezone_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_oru_r01(_read("oru_r01_nist_elr_2.5.1_lead.hl7"), default_timezone="Mars/Olympus")


_SEGMENT = st.builds(
    lambda name, fields: name + "|" + "|".join(fields),
    st.sampled_from(["PID", "OBR", "OBX", "NTE", "ZZZ", "obx"]),
    st.lists(st.text(alphabet="0123456789ABCNMSTXE^~&\\.-<> :_", max_size=12), max_size=16),
)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_gives_observations_or_a_typed_error(text: str) -> None:
    try:
        result = parse_oru_r01(text)
    except MCPFhirError:
        return
    assert isinstance(result, list)


@settings(max_examples=150, deadline=None)
@given(st.lists(_SEGMENT, max_size=8))
def test_arbitrary_oru_shaped_messages_give_observations_or_a_typed_error(segments: list[str]) -> None:
    message = "\r".join(["MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X1|P|2.5.1", *segments])
    try:
        result = parse_oru_r01(message)
    except MCPFhirError:
        return
    assert all(o["resourceType"] == "Observation" for o in result)
