"""An Australian microbiology ORU^R01 keeps its structure: report, panel, specimen, order numbers, organism links.

Golden sample (tests/data/SOURCES.md, vendor-samples/SOURCES.md §4): a Queensland Health AUSLAB urine M/C/S
(Princess Alexandra Hospital, HL7 v2.3.1 profiled by AS 4700.2) from angusmillar/PeterPiper's tests: an
organism (OBX-4 sub-ID 1, E. coli ESBL producer) with its quantity "2+" (sub-ID 1), and a sensitivity panel
OBR for the same order. The public message's sensitivity panel carries only a comment, so the susceptibility
tests add antibiotic OBXs to it the way AS 4700.2 labs send them (sub-ID = the organism's), or name the
parent with OBR-26 as HL7 v2 chapter 7 does; those additions are marked where they are made.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from mcp_fhir.ehr.hl7v2 import parse_oru_r01_message
from tests.data import VENDOR_SAMPLES

MICRO = VENDOR_SAMPLES / "oru_r01_au_microbiology_qld_auslab_urine_mcs.hl7"
QLD_CHEMISTRY = VENDOR_SAMPLES / "oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"
TZ = "Australia/Brisbane"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _message() -> str:
    return MICRO.read_bytes().decode("utf-8")


def _parse(text: str) -> Any:
    return parse_oru_r01_message(text, default_timezone=TZ)


def _by_code(resources: list[dict[str, Any]], code: str) -> dict[str, Any]:
    return next(r for r in resources if any(c.get("code") == code for c in r["code"].get("coding", [])))


def _ref(resource: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"Observation/{resource['id']}"}


def _with_susceptibilities(text: str, *, parent_result: str = "") -> str:
    """The public message plus antibiotic OBXs in its sensitivity panel (a synthetic addition, see docstring)."""
    lines = text.strip("\r").split("\r")
    sens = next(i for i, line in enumerate(lines) if line.startswith("OBR|2|"))
    if parent_result:
        fields = lines[sens].split("|")
        fields += [""] * (27 - len(fields))
        fields[26] = parent_result  # OBR-26: parent OBX-3 ^ OBX-4 sub-ID ^ OBX-5 text
        lines[sens] = "|".join(fields)
    sub = "" if parent_result else "1"
    added = [
        f"OBX|2|ST|AMP^Ampicillin^AUSLAB|{sub}|R||||||F|||201405270954",
        f"OBX|3|ST|CIP^Ciprofloxacin^AUSLAB|{sub}|S||||||F|||201405270954",
        f"OBX|4|ST|NIT^Nitrofurantoin^AUSLAB|{sub}|S||||||F|||201405270954",
    ]
    return "\r".join([*lines, *added]) + "\r"


def test_the_public_au_urine_mcs_becomes_two_reports_with_their_eighteen_observations() -> None:
    result = _parse(_message())
    assert len(result.observations) == 18
    assert [r["code"]["text"] for r in result.reports] == ["Urine M/C/S", "Sensitivity Panel"]
    culture, sensitivity = result.reports
    assert culture["result"] == [_ref(o) for o in result.observations[:17]]
    assert sensitivity["result"] == [_ref(result.observations[17])]
    assert culture["status"] == "final" and sensitivity["status"] == "preliminary"
    assert {c["coding"][0]["code"] for c in culture["category"]} == {"LAB", "MB"}
    assert culture["effectiveDateTime"] == "2014-05-27T09:00:00+10:00"
    assert culture["issued"] == "2014-05-27T09:56:00+10:00"
    for report in result.reports:
        DiagnosticReport.model_validate(report)
    for observation in result.observations:
        Observation.model_validate(observation)


def test_the_organism_and_its_quantity_stay_linked_by_their_sub_id() -> None:
    result = _parse(_message())
    organism = _by_code(result.observations, "ORG")
    quantity = _by_code(result.observations, "QUANT")
    assert organism["valueCodeableConcept"]["text"] == "E. coli (ESBL Producer)"
    assert quantity["valueString"] == "2+"
    assert organism["hasMember"] == [_ref(quantity)]
    assert quantity["derivedFrom"] == [_ref(organism)]
    # OBXs without a sub-ID stand alone.
    microscopy = _by_code(result.observations, "URBC")
    assert "hasMember" not in microscopy and "derivedFrom" not in microscopy


def test_the_placer_and_filler_order_numbers_and_the_panel_are_kept() -> None:
    result = _parse(_message())
    culture = result.reports[0]
    by_type = {i["type"]["coding"][0]["code"]: i for i in culture["identifier"]}
    assert by_type["PLAC"]["value"] == "141470000018"
    assert by_type["FILL"]["value"] == "1202"
    assert by_type["FILL"]["system"] == "urn:mcp-fhir:hl7v2:id:AUSLAB"
    assert culture["code"]["coding"][0] == {
        "system": "urn:mcp-fhir:hl7v2:cs:AUSLAB",
        "code": "URINE",
        "display": "Urine M/C/S",
    }
    organism = _by_code(result.observations, "ORG")
    numbers = {
        (b["identifier"]["type"]["coding"][0]["code"], b["identifier"]["value"]) for b in organism["basedOn"]
    }
    assert numbers == {("PLAC", "141470000018"), ("FILL", "1202")}
    assert {b["display"] for b in organism["basedOn"]} == {"Urine M/C/S"}
    assert all(b["type"] == "ServiceRequest" for b in organism["basedOn"])
    assert {c["coding"][0]["code"] for c in organism["category"]} == {"laboratory", "MB"}


def test_the_specimen_from_obr_15_is_contained_and_referenced() -> None:
    result = _parse(_message())
    culture = result.reports[0]
    (specimen,) = culture["contained"]
    assert specimen["resourceType"] == "Specimen"
    assert specimen["type"]["coding"][0]["code"] == "URINE"
    assert specimen["collection"]["collectedDateTime"] == "2014-05-27T09:00:00+10:00"
    assert specimen["receivedTime"] == "2014-05-27T09:01:00+10:00"
    assert culture["specimen"] == [{"reference": "#specimen"}]
    quantity = _by_code(result.observations, "QUANT")
    assert quantity["specimen"] == {"reference": "#specimen"}
    assert quantity["contained"] == [specimen]


def test_susceptibilities_in_the_sensitivity_panel_link_to_the_organism_by_sub_id() -> None:
    result = _parse(_with_susceptibilities(_message()))
    organism = _by_code(result.observations, "ORG")
    quantity = _by_code(result.observations, "QUANT")
    drugs = [_by_code(result.observations, code) for code in ("AMP", "CIP", "NIT")]
    assert organism["hasMember"] == [_ref(quantity), *(_ref(d) for d in drugs)]
    assert all(d["derivedFrom"] == [_ref(organism)] for d in drugs)
    comment = _by_code(result.observations, "CULCOM")
    assert "derivedFrom" not in comment  # no sub-ID: not about one organism


def test_a_sensitivity_panel_that_names_its_parent_in_obr_26_links_every_result_to_it() -> None:
    result = _parse(_with_susceptibilities(_message(), parent_result="ORG&Organism&AUSLAB^1^E. coli"))
    organism = _by_code(result.observations, "ORG")
    for code in ("CULCOM", "AMP", "CIP", "NIT"):
        assert _by_code(result.observations, code)["derivedFrom"] == [_ref(organism)]


def test_an_spm_segment_gives_the_specimen_its_identifier_type_and_times() -> None:
    text = _message().replace(
        "\rOBX|1|CE|MSTAT",
        "\rSPM|1|SP-77&AUSLAB||122575003^Urine specimen^SCT|||||||||||||201405270850|201405270905\rOBX|1|CE|MSTAT",
        1,
    )
    specimen = _parse(text).reports[0]["contained"][0]
    assert specimen["identifier"][0]["value"] == "SP-77"
    assert specimen["type"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "122575003",
        "display": "Urine specimen",
    }
    assert specimen["collection"]["collectedDateTime"] == "2014-05-27T08:50:00+10:00"
    assert specimen["receivedTime"] == "2014-05-27T09:05:00+10:00"


def test_a_chemistry_message_gets_reports_but_no_invented_links() -> None:
    result = _parse(QLD_CHEMISTRY.read_bytes())
    assert len(result.reports) == 5
    assert sum(len(r["result"]) for r in result.reports) == len(result.observations)
    assert not any("hasMember" in o or "derivedFrom" in o for o in result.observations)


@pytest.mark.parametrize("sub_id", ["1", "1"])
def test_one_sub_id_on_every_obx_of_a_chemistry_panel_links_nothing(sub_id: str) -> None:
    text = (
        "MSH|^~\\&|LAB|X|||20240101||ORU^R01|M1|P|2.3.1\r"
        "PID|1||P1^^^X^MR\r"
        "OBR|1|A1|B1^LAB|UEC^Electrolytes^L|||20240101||||||||||||||||CH|F\r"
        f"OBX|1|NM|NA^Sodium^L|{sub_id}|140|mmol/L||||F\r"
        f"OBX|2|NM|K^Potassium^L|{sub_id}|4.1|mmol/L||||F\r"
    )
    result = _parse(text)
    assert not any("hasMember" in o or "derivedFrom" in o for o in result.observations)


GOLDEN = VENDOR_SAMPLES.parent / "golden" / "oru_r01_au_microbiology_qld_auslab_urine_mcs.json"


def test_the_public_au_urine_mcs_maps_exactly_to_its_reviewed_golden_output() -> None:
    """The whole mapping, compared with tests/data/golden/ (reviewed by hand when it was written).

    After an intended change to the mapping, rewrite the golden file from `parse_oru_r01_message` (same
    sample, timezone Australia/Brisbane), review the diff, and commit both.
    """
    result = _parse(_message())
    actual = {
        "reports": result.reports,
        "observations": result.observations,
        "patient_identifiers": result.patient_identifiers,
        "control_id": result.control_id,
    }
    assert actual == json.loads(GOLDEN.read_text(encoding="utf-8"))
