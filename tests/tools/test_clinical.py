"""Clinical tools: the patient binding of every resource, the upstream query, enforcement counts,
continuations through the call path, `patient_summary` with some or all sections denied (one audit
record per call), and `search_immunizations`."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from mcp_fhir._exceptions import InvalidArgument, PolicyDenied
from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.catalog import SUMMARY_SECTIONS
from mcp_fhir.ehr.client import FetchResult
from mcp_fhir.policy.engine import Decision, Obligations
from mcp_fhir.tools.callpath import enforce_resources, references_patient
from mcp_fhir.tools.clinical import SEARCH_TOOLS, upstream_query
from mcp_fhir.tools.results import make_continuation
from tests.data import VENDOR_SAMPLES
from tests.tools.conftest import (
    KEY,
    OTHER_PATIENT,
    PATIENT,
    allow_with,
    deny_with,
    make_harness,
    observation,
)

VENDOR = VENDOR_SAMPLES
OWN = f"Patient/{PATIENT}"
FOREIGN = f"Patient/{OTHER_PATIENT}"

BINDING_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "subject is the patient": (observation("o"), True),
    "patient element is the patient": (
        {"resourceType": "AllergyIntolerance", "id": "a", "patient": {"reference": OWN}},
        True,
    ),
    "an absolute reference to the patient": (
        {"resourceType": "Condition", "id": "c", "subject": {"reference": f"https://ehr.example/fhir/{OWN}"}},
        True,
    ),
    "the Patient resource itself": ({"resourceType": "Patient", "id": PATIENT}, True),
    "another Patient resource": ({"resourceType": "Patient", "id": OTHER_PATIENT}, False),
    "subject is another patient": (observation("o", OTHER_PATIENT), False),
    "no subject at all": ({"resourceType": "Observation", "id": "o"}, False),
    "a Group subject": (
        {"resourceType": "Observation", "id": "o", "subject": {"reference": "Group/g"}},
        False,
    ),
    "a subject whose id only starts with the patient id": (observation("o", PATIENT + "0"), False),
    "a subject with a history suffix": (
        {"resourceType": "Observation", "id": "o", "subject": {"reference": FOREIGN + "/_history/1"}},
        False,
    ),
    "subject is the patient but patient names another": (
        observation("o", patient={"reference": FOREIGN}),
        False,
    ),
    "a foreign patient as performer": (observation("o", performer=[{"reference": FOREIGN}]), False),
    "a conditional reference to a patient": (
        observation("o", performer=[{"reference": "Patient?identifier=urn:x|123"}]),
        False,
    ),
    "the patient as performer too": (observation("o", performer=[{"reference": OWN}]), True),
    "a contained Patient resource": (
        observation("o", contained=[{"resourceType": "Patient", "id": "p1", "name": [{"text": "x"}]}]),
        False,
    ),
    "a contained resource about another patient": (
        observation(
            "o", contained=[{"resourceType": "Specimen", "id": "s", "subject": {"reference": FOREIGN}}]
        ),
        False,
    ),
    "a contained resource that is not a patient": (
        observation(
            "o", contained=[{"resourceType": "Medication", "id": "m"}], performer=[{"reference": "#m"}]
        ),
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(BINDING_CASES))
def test_references_patient_accepts_only_resources_bound_to_the_authorised_patient(name: str):
    resource, expected = BINDING_CASES[name]
    assert references_patient(resource, PATIENT) is expected


def test_references_patient_accepts_a_real_medication_statement_with_a_contained_medication():
    # Source: HL7 FHIR R4 example via fhir_models (see vendor-samples/SOURCES.md, r4_medicationstatement.json).
    sample = json.loads((VENDOR / "r4_medicationstatement.json").read_text(encoding="utf-8"))
    assert references_patient(sample, "pat1")
    assert not references_patient(sample, "pat2")


def test_references_patient_accepts_a_real_document_reference_with_a_contained_author():
    # Source: fhir_models documentreference-example.json (vendor-samples/r4_documentreference_securitylabel_V.json).
    sample = json.loads((VENDOR / "r4_documentreference_securitylabel_V.json").read_text(encoding="utf-8"))
    assert references_patient(sample, "xcda")


def _query(ob: Obligations, rtype: str = "Observation", **kwargs: Any) -> dict[str, Any]:
    args = {"category": None, "code": None, "date_from": None, "date_to": None, **kwargs}
    return upstream_query(rtype, "b-1", ob, **args)


def _days_ago(days: int) -> set[str]:
    # Either side of midnight while the test runs.
    today = datetime.now(UTC).date()
    return {
        f"ge{(today - timedelta(days=days)).isoformat()}",
        f"ge{(today - timedelta(days=days - 1)).isoformat()}",
    }


def test_the_query_always_names_the_backend_patient_and_nothing_else_by_default():
    assert _query(Obligations()) == {"patient": "b-1"}


def test_a_lookback_narrows_an_older_date_from_to_the_lookback():
    query = _query(Obligations(max_lookback_days=30), date_from=date(2000, 1, 1))
    assert query["date"] in _days_ago(30)


def test_a_lookback_keeps_a_date_from_that_is_already_newer():
    recent = datetime.now(UTC).date() - timedelta(days=2)
    query = _query(Obligations(max_lookback_days=30), date_from=recent, date_to=recent + timedelta(days=1))
    assert query["date"] == [f"ge{recent.isoformat()}", f"le{(recent + timedelta(days=1)).isoformat()}"]


def test_a_lookback_alone_becomes_the_date_lower_bound():
    assert _query(Obligations(max_lookback_days=7))["date"] in _days_ago(7)


def test_allowed_categories_are_pushed_up_front_when_the_caller_names_none():
    ob = Obligations(allowed_categories={"Observation": frozenset({"vital-signs", "laboratory"})})
    assert _query(ob)["category"] == "laboratory,vital-signs"


def test_an_explicit_category_is_kept_and_enforcement_still_follows():
    ob = Obligations(allowed_categories={"Observation": frozenset({"laboratory"})})
    assert _query(ob, category="social-history")["category"] == "social-history"


def test_a_family_without_a_category_parameter_gets_none_and_its_own_code_parameter():
    ob = Obligations(allowed_categories={"Encounter": frozenset({"x"})})
    assert _query(ob, rtype="Encounter", code="AMB") == {"patient": "b-1", "type": "AMB"}


def test_each_family_uses_its_own_date_parameter():
    assert "recorded-date" in _query(Obligations(), rtype="Condition", date_to=date(2020, 1, 1))
    assert "authoredon" in _query(Obligations(), rtype="MedicationRequest", date_to=date(2020, 1, 1))


def test_enforcement_counts_foreign_resources_as_over_limit_and_each_obligation_by_cause():
    label = {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]}
    ob = Obligations(
        exclude_security_labels=frozenset({"PSY"}),
        allowed_categories={"Observation": frozenset({"laboratory"})},
        redact=("Observation.note",),
        max_results=1,
    )
    lab = [{"coding": [{"code": "laboratory"}]}]
    resources = [
        observation("own-1", category=lab, note=[{"text": "n"}]),
        observation("own-2", category=lab),
        observation("labelled", category=lab, meta=label),
        observation("social", category=[{"coding": [{"code": "social-history"}]}]),
        observation("foreign", OTHER_PATIENT, category=lab),
    ]
    enforced = enforce_resources(resources, PATIENT, ob)
    kept = enforced.resources
    assert [r["id"] for r in kept] == ["own-1"]
    assert "note" not in kept[0]
    assert enforced.withheld.model_dump() == {
        "security_label": 1,
        "category": 1,
        "lookback": 0,
        "over_limit": 2,  # one truncated, one foreign
        "redacted_elements": 1,
    }


class PagingEHR:
    """A fake EHR that answers every search with a next link and records the link it was asked for."""

    name = "fake"

    def __init__(self) -> None:
        self.next_urls: list[str | None] = []

    async def search(
        self, resource_type: str, params: Any, *, patient: Any, page_size: int, **kw: Any
    ) -> Any:
        self.next_urls.append(kw.get("next_url"))
        return FetchResult(
            [observation(f"o{len(self.next_urls)}")],
            "fake",
            datetime.now(UTC),
            next_url=f"http://ehr.example/fhir/Observation?page={len(self.next_urls) + 1}",
        )


async def _search(h: Any, tool: str = "search_observations", **kwargs: Any) -> Any:
    return await h.run(tool, patient_id=PATIENT, purpose="treatment", **kwargs)


async def test_a_continuation_from_one_page_fetches_exactly_the_next_upstream_link():
    h = make_harness()
    ehr = PagingEHR()
    h.app.backends = {"fake": ehr}  # type: ignore[dict-item]
    first = await _search(h)
    token = first.structured_content["continuation"]
    await _search(h, continuation=token)
    assert ehr.next_urls == [None, "http://ehr.example/fhir/Observation?page=2"]
    assert [r.params.get("continuation") for r in h.sink.records] == [None, True]


@pytest.mark.parametrize("tool", ["search_conditions", "search_observations"])
async def test_a_continuation_for_another_tool_or_patient_is_refused_before_the_policy(tool: str):
    h = make_harness()
    patient = OTHER_PATIENT if tool == "search_observations" else PATIENT
    token = make_continuation(KEY, tool=tool, patient=patient, next_url="http://ehr.example/fhir/x")
    with pytest.raises(InvalidArgument) as caught:
        await _search(h, continuation=token)
    assert (caught.value.code, caught.value.argument) == ("invalid_argument", "continuation")
    assert [(r.result, r.error_code) for r in h.sink.records] == [("error", "invalid_argument")]
    assert h.engine.calls == [] and h.ehr.calls == []


def _by_type(denied: set[str]) -> Any:
    def decide(i: Any) -> Decision:
        rtype = i["action"]["resource_type"]
        return deny_with("ROLE_NOT_PERMITTED", decision_id=f"d-{rtype}") if rtype in denied else allow_with()

    return decide


async def test_a_summary_with_some_sections_denied_shows_the_rest_in_one_audit_record():
    h = make_harness(
        _by_type({"Condition", "MedicationStatement"}),
        resources=[{"resourceType": "Patient", "id": PATIENT, "birthDate": "1950-01-01"}, observation("o1")],
    )
    result = await h.run("patient_summary", patient_id=PATIENT, purpose="treatment")
    sections = {s["resource_type"]: s for s in result.structured_content["sections"]}
    assert {k for k, s in sections.items() if not s["allowed"]} == {"Condition", "MedicationStatement"}
    assert sections["Condition"]["reasons"] == ["ROLE_NOT_PERMITTED"]
    assert sections["Condition"]["decision_id"] == "d-Condition"
    assert (sections["Observation"]["count"], sections["Patient"]["count"]) == (1, 1)
    [record] = h.sink.records
    assert (record.result, record.tool, record.patient, record.returned_count) == (
        "allowed",
        "patient_summary",
        PATIENT,
        2,
    )
    assert [(s["resource_type"], s["result"]) for s in record.extra["sections"]] == [
        (t, "denied" if t in {"Condition", "MedicationStatement"} else "allowed") for t in SUMMARY_SECTIONS
    ]
    assert record.reason_codes == ("ROLE_NOT_PERMITTED",)
    assert [s.get("cache") for s in record.extra["sections"]] == [
        None if t in {"Condition", "MedicationStatement"} else "miss" for t in SUMMARY_SECTIONS
    ]
    assert {op for op, _t in h.ehr.calls} <= {"read", "search"}
    assert {t for _op, t in h.ehr.calls} == set(SUMMARY_SECTIONS) - {"Condition", "MedicationStatement"}
    assert "withheld by policy" in result.content[0].text


async def test_a_summary_with_every_section_denied_is_one_denial_audited_once():
    h = make_harness(_by_type(set(SUMMARY_SECTIONS)))
    with pytest.raises(PolicyDenied) as caught:
        await h.run("patient_summary", patient_id=PATIENT, purpose="treatment")
    assert caught.value.reasons == ["ROLE_NOT_PERMITTED"]
    assert [(r.result, r.tool) for r in h.sink.records] == [("denied", "patient_summary")]
    assert len(h.engine.calls) == len(SUMMARY_SECTIONS)
    assert h.ehr.calls == []


async def test_a_summarys_alerts_are_the_union_of_its_sections_alerts_in_its_one_record():
    def decide(i: Any) -> Decision:
        rtype = i["action"]["resource_type"]
        alerts = ("after_hours", "sensitive_access") if rtype == "Condition" else ("after_hours",)
        return Decision(allow=True, alerts=alerts, decision_id=f"d-{rtype}")

    h = make_harness(decide, resources=[{"resourceType": "Patient", "id": PATIENT}])
    await h.run("patient_summary", patient_id=PATIENT, purpose="treatment")
    [record] = h.sink.records
    assert record.alerts == ("after_hours", "sensitive_access")
    [found], _cursor = await h.sink.query(AuditQuery(alert="sensitive_access"), limit=10, cursor=None)
    assert found["request_id"] == record.request_id


def immunization(rid: str, patient: str = PATIENT, when: str = "2026-10-01") -> dict[str, Any]:
    return {
        "resourceType": "Immunization",
        "id": rid,
        "status": "completed",
        "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
        "patient": {"reference": f"Patient/{patient}"},
        "occurrenceDateTime": when,
    }


def test_search_immunizations_is_declared_like_every_other_search_family():
    [tool] = [t for t in SEARCH_TOOLS if t.name == "search_immunizations"]
    assert (tool.operation, tool.resource_type) == ("search", "Immunization")


async def test_search_immunizations_returns_only_the_patients_immunizations_and_audits_them():
    h = make_harness(resources=[immunization("i1"), immunization("i2", OTHER_PATIENT)])
    result = await _search(h, "search_immunizations", code="http://hl7.org/fhir/sid/cvx|140")
    body = result.structured_content
    assert [r["id"] for r in body["resources"]] == ["i1"]
    assert body["withheld"]["over_limit"] == 1
    [d_input] = h.engine.calls
    assert d_input["action"]["resource_type"] == "Immunization"
    assert d_input["resource"]["params"] == {"code": "http://hl7.org/fhir/sid/cvx|140"}
    assert [(r.result, r.tool, r.returned_count) for r in h.sink.records] == [
        ("allowed", "search_immunizations", 1)
    ]


def test_the_immunization_query_uses_its_date_and_vaccine_code_parameters():
    query = _query(Obligations(max_lookback_days=7), rtype="Immunization", code="140")
    assert query["vaccine-code"] == "140"
    assert query["date"] in _days_ago(7)


async def test_a_lookback_keeps_recent_immunizations_and_withholds_old_ones():
    recent = (datetime.now(UTC).date() - timedelta(days=3)).isoformat()
    h = make_harness(
        lambda _i: allow_with(Obligations(max_lookback_days=30)),
        resources=[immunization("new", when=recent), immunization("old", when="2001-01-01")],
    )
    body = (await _search(h, "search_immunizations")).structured_content
    assert [r["id"] for r in body["resources"]] == ["new"]
    assert body["withheld"]["lookback"] == 1
