"""Clinical tools: the patient binding of every resource, the upstream query, enforcement counts,
continuations through `search_tool`, and `patient_summary` with some or all sections denied."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from mcp_fhir._exceptions import InvalidArgument, PolicyDenied
from mcp_fhir.catalog import SUMMARY_SECTIONS
from mcp_fhir.ehr.client import FetchResult
from mcp_fhir.policy.engine import Decision, Obligations
from mcp_fhir.tools.clinical import enforce_page, references_patient, search_tool, summary, upstream_query
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


def _fetch(*resources: dict[str, Any]) -> FetchResult:
    return FetchResult(list(resources), "fake", datetime.now(UTC))


def test_enforce_page_counts_foreign_resources_as_over_limit_and_each_obligation_by_cause():
    label = {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]}
    ob = Obligations(
        exclude_security_labels=frozenset({"PSY"}),
        allowed_categories={"Observation": frozenset({"laboratory"})},
        redact=("Observation.note",),
        max_results=1,
    )
    lab = [{"coding": [{"code": "laboratory"}]}]
    fetch = _fetch(
        observation("own-1", category=lab, note=[{"text": "n"}]),
        observation("own-2", category=lab),
        observation("labelled", category=lab, meta=label),
        observation("social", category=[{"coding": [{"code": "social-history"}]}]),
        observation("foreign", OTHER_PATIENT, category=lab),
    )
    call = SimpleNamespace(backend_patient=PATIENT, decision=Decision(allow=True, obligations=ob))
    kept, withheld = enforce_page(call, fetch)  # type: ignore[arg-type]
    assert [r["id"] for r in kept] == ["own-1"]
    assert "note" not in kept[0]
    assert withheld.model_dump() == {
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


async def _search(h: Any, **kwargs: Any) -> Any:
    return await search_tool(
        h.ctx,
        tool="search_observations",
        rtype="Observation",
        patient_id=PATIENT,
        purpose="treatment",
        break_glass_reason=None,
        **kwargs,
    )


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
    assert h.engine.calls == [] and h.ehr.calls == []


def _by_type(denied: set[str]) -> Any:
    def decide(i: Any) -> Decision:
        rtype = i["action"]["resource_type"]
        return deny_with("ROLE_NOT_PERMITTED", decision_id=f"d-{rtype}") if rtype in denied else allow_with()

    return decide


async def test_a_summary_with_some_sections_denied_shows_the_rest_and_audits_every_section():
    h = make_harness(
        _by_type({"Condition", "MedicationStatement"}),
        resources=[{"resourceType": "Patient", "id": PATIENT, "birthDate": "1950-01-01"}, observation("o1")],
    )
    result = await summary(h.ctx, PATIENT, "treatment", None)
    sections = {s["resource_type"]: s for s in result.structured_content["sections"]}
    assert {k for k, s in sections.items() if not s["allowed"]} == {"Condition", "MedicationStatement"}
    assert sections["Condition"]["reasons"] == ["ROLE_NOT_PERMITTED"]
    assert sections["Condition"]["decision_id"] == "d-Condition"
    assert (sections["Observation"]["count"], sections["Patient"]["count"]) == (1, 1)
    assert sorted((r.resource_type, r.result) for r in h.sink.records) == sorted(
        (t, "denied" if t in {"Condition", "MedicationStatement"} else "allowed") for t in SUMMARY_SECTIONS
    )
    assert {op for op, _t in h.ehr.calls} <= {"read", "search"}
    assert {t for _op, t in h.ehr.calls} == set(SUMMARY_SECTIONS) - {"Condition", "MedicationStatement"}
    assert "withheld by policy" in result.content[0].text


async def test_a_summary_with_every_section_denied_is_a_denial_audited_once_per_section():
    h = make_harness(_by_type(set(SUMMARY_SECTIONS)))
    with pytest.raises(PolicyDenied) as caught:
        await summary(h.ctx, PATIENT, "treatment", None)
    assert caught.value.audited
    assert caught.value.reasons == ["ROLE_NOT_PERMITTED"]
    assert len(h.sink.records) == len(SUMMARY_SECTIONS)
    assert h.ehr.calls == []
