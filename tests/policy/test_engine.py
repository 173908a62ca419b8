"""`Decision.parse` is the one place an OPA answer is interpreted: anything off-contract fails closed."""

import pytest

from mcp_fhir._exceptions import PolicyMalformed, PolicyUndefined
from mcp_fhir.policy.engine import Decision

OBLIGATIONS = {
    "exclude_security_labels": ["PSY"],
    "allowed_categories": {"Observation": ["laboratory"]},
    "redact": ["Patient.telecom"],
    "max_lookback_days": 30,
    "max_results": 50,
}


def allow(**over):
    return {"result": {"allow": True, "reasons": [], "obligations": {**OBLIGATIONS, **over}, "audit": {}}}


def test_a_well_formed_allow_is_parsed_with_every_obligation():
    d = Decision.parse(allow(), decision_id="d1", revision="r1")
    assert d.allow and d.decision_id == "d1" and d.revision == "r1"
    assert d.obligations.exclude_security_labels == {"PSY"}
    assert d.obligations.allowed_categories == {"Observation": {"laboratory"}}
    assert d.obligations.redact == ("Patient.telecom",)
    assert (d.obligations.max_lookback_days, d.obligations.max_results) == (30, 50)


def test_a_deny_keeps_its_reason_codes_sorted():
    body = {"result": {"allow": False, "reasons": [{"code": "B"}, {"code": "A", "message": "m"}]}}
    assert Decision.parse(body).reason_codes == ("A", "B")


def test_a_missing_result_is_undefined():
    with pytest.raises(PolicyUndefined) as err:
        Decision.parse({"decision_id": "x"}, decision_id="x")
    assert err.value.code == "opa_undefined"


@pytest.mark.parametrize(
    "body",
    [
        [],
        "allow",
        {"result": True},
        {"result": {"allow": "yes"}},
        {"result": {"allow": 1}},
        {"result": {"allow": False, "reasons": []}},
        {"result": {"allow": False, "reasons": [{"message": "no code"}]}},
        {"result": {"allow": False, "reasons": "ROLE"}},
        {"result": {"allow": True, "reasons": []}},
        {"result": {"allow": True, "obligations": {"redact": []}}},
        allow(exclude_security_labels="PSY"),
        allow(allowed_categories=["laboratory"]),
        allow(max_results=-1),
        allow(max_results=True),
        allow(max_lookback_days=1.5),
        {"result": {"allow": True, "obligations": OBLIGATIONS, "audit": {"alerts": "after_hours"}}},
        allow(audit_patients="pat-1"),
        allow(audit_patients=[1, 2]),
        allow(audit_patients={"pat-1": True}),
    ],
    ids=lambda b: str(b)[:60],
)
def test_an_off_contract_answer_is_malformed_and_never_an_allow(body):
    with pytest.raises(PolicyMalformed) as err:
        Decision.parse(body)
    assert err.value.code == "opa_malformed"


def test_audit_patients_null_means_any_patient_and_is_remembered_as_present():
    ob = Decision.parse(allow(audit_patients=None)).obligations
    assert (ob.audit_patients, "audit_patients" in ob.present) == (None, True)
    assert ob.to_dict()["audit_patients"] is None


def test_audit_patients_as_a_list_is_the_set_of_patients_whose_events_may_be_seen():
    ob = Decision.parse(allow(audit_patients=["pat-2", "pat-1"])).obligations
    assert ob.audit_patients == {"pat-1", "pat-2"}
    assert ob.to_dict()["audit_patients"] == ["pat-1", "pat-2"]


def test_a_decision_without_audit_patients_says_so_and_its_dict_is_unchanged():
    ob = Decision.parse(allow()).obligations
    assert "audit_patients" not in ob.present
    assert "audit_patients" not in ob.to_dict()


def test_the_obligations_repr_never_shows_a_patient_id():
    ob = Decision.parse(allow(audit_patients=["pat-secret-9"])).obligations
    assert "pat-secret-9" not in repr(ob) and "pat-secret-9" not in repr(Decision(allow=True, obligations=ob))


def test_a_confirm_obligation_is_parsed_and_kept_in_the_dict():
    ob = Decision.parse(allow(confirm={"prompt_code": "confirm_clinical_note", "ttl_s": 120})).obligations
    assert ob.confirm == {"prompt_code": "confirm_clinical_note", "ttl_s": 120}
    assert "confirm" in ob.present
    assert ob.to_dict()["confirm"] == {"prompt_code": "confirm_clinical_note", "ttl_s": 120}


def test_no_confirm_or_a_null_one_asks_no_person():
    for body in (allow(), allow(confirm=None)):
        ob = Decision.parse(body).obligations
        assert ob.confirm is None and "confirm" not in ob.present and "confirm" not in ob.to_dict()


@pytest.mark.parametrize(
    "confirm",
    [
        "yes",
        {"ttl_s": 10},
        {"prompt_code": "", "ttl_s": 10},
        {"prompt_code": "p", "ttl_s": 0},
        {"prompt_code": "p", "ttl_s": True},
        {"prompt_code": "p"},
    ],
)
def test_an_off_contract_confirm_obligation_is_malformed(confirm):
    with pytest.raises(PolicyMalformed):
        Decision.parse(allow(confirm=confirm))
