"""Policy diff: classification of changed decisions, approvals, and replays against the real OPA.

The real-OPA tests copy `policies/` to a temp folder and edit the copy's role data, exactly as a
security engineer would in a pull request (nurse gains MedicationStatement).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.governance.diff import (
    Approvals,
    BatchEvaluator,
    Case,
    classify,
    decision_key,
    diff_cases,
    unique_cases,
)
from mcp_fhir.governance.grid import GRID_PATIENT, fixture_cases, grid_cases
from tests.testbed.sidecar import policies_with_nurse_reading_medications

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"

ALLOW = {
    "allow": True,
    "reasons": [],
    "obligations": {
        "exclude_security_labels": ["HIV", "PSY"],
        "allowed_categories": {"Observation": ["laboratory"]},
        "redact": ["Patient.address"],
        "max_lookback_days": 30,
        "max_results": 50,
    },
    "audit": {"sensitivity": "standard", "alerts": []},
}
DENY = {
    "allow": False,
    "reasons": [{"code": "ROLE_NOT_PERMITTED"}],
    "obligations": {},
    "audit": ALLOW["audit"],
}


def with_obligations(**changes: object) -> dict:
    return {**ALLOW, "obligations": {**ALLOW["obligations"], **changes}}


def test_identical_decisions_are_not_a_change():
    assert classify(ALLOW, dict(ALLOW)) is None


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (with_obligations(exclude_security_labels=["PSY"]), "fewer_excluded_labels"),
        (with_obligations(allowed_categories={}), "category_restriction_lifted"),
        (
            with_obligations(allowed_categories={"Observation": ["laboratory", "vital-signs"]}),
            "more_categories",
        ),
        (with_obligations(redact=[]), "removed_redaction"),
        (with_obligations(max_lookback_days=365), "longer_lookback"),
        (with_obligations(max_lookback_days=None), "longer_lookback"),
        (with_obligations(max_results=100), "higher_max_results"),
    ],
)
def test_every_widened_obligation_is_a_widening(head, kind):
    classification, facets = classify(ALLOW, head)
    assert classification == "widening"
    assert kind in [k for k, _ in facets]


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (with_obligations(exclude_security_labels=["HIV", "PSY", "SUD"]), "more_excluded_labels"),
        (with_obligations(redact=["Patient.address", "Patient.telecom"]), "added_redaction"),
        (with_obligations(max_lookback_days=7), "shorter_lookback"),
        (with_obligations(max_results=10), "lower_max_results"),
        (with_obligations(allowed_categories={"Observation": []}), "fewer_categories"),
    ],
)
def test_every_tightened_obligation_is_a_narrowing(head, kind):
    classification, facets = classify(ALLOW, head)
    assert classification == "narrowing"
    assert kind in [k for k, _ in facets]


def test_deny_to_allow_is_a_widening_and_allow_to_deny_a_narrowing():
    assert classify(DENY, ALLOW)[0] == "widening"
    assert classify(ALLOW, DENY)[0] == "narrowing"


def test_an_undefined_decision_counts_as_a_deny():
    assert classify(None, ALLOW)[0] == "widening"
    assert classify(None, DENY)[0] == "changed"  # different reason: opa_undefined → ROLE_NOT_PERMITTED


def test_different_deny_reasons_are_a_change_that_is_neither_widening_nor_narrowing():
    other = {**DENY, "reasons": [{"code": "PURPOSE_REQUIRED"}]}
    classification, facets = classify(DENY, other)
    assert classification == "changed"
    assert facets[0][0] == "deny_reasons_changed"


def test_approvals_must_name_a_reviewer_and_a_ticket():
    with pytest.raises(ConfigError) as err:
        Approvals.from_mapping({"approvals": [{"id": "A", "role": "nurse", "tool": "*", "purpose": "*",
                                               "kind": "deny_to_allow", "reviewer": "r"}]})  # fmt: skip
    assert err.value.code == "config_invalid"
    assert err.value.key == "approvals[0].ticket"


def test_an_approval_kind_must_be_a_widening_kind():
    with pytest.raises(ConfigError) as err:
        Approvals.from_mapping({"approvals": [{"id": "A", "role": "nurse", "tool": "*", "purpose": "*",
                                               "kind": "allow_to_deny", "reviewer": "r", "ticket": "T"}]})  # fmt: skip
    assert err.value.key == "approvals[0].kind"


def test_the_shipped_approvals_file_is_valid():
    Approvals.load(POLICIES / "approvals.yaml")


def test_the_grid_takes_roles_tools_and_purposes_from_both_sides():
    base = {"roles": {"nurse": {}}, "purposes": {"treatment": {}},
            "tools": {"read_patient": {"operation": "read", "resource_types": ["Patient"]}}}  # fmt: skip
    allergies = {"operation": "search", "resource_types": ["AllergyIntolerance"]}
    head = {"roles": {"pharmacist": {}}, "purposes": {"audit": {}}, "tools": {"search_allergies": allergies}}
    cases = grid_cases([head, base])
    roles = {c.input["subject"]["claims"]["roles"][0] for c in cases}
    tools = {c.input["action"]["tool"] for c in cases}
    purposes = {c.input["context"]["purpose"] for c in cases}
    assert roles == {"nurse", "pharmacist"}
    assert tools == {"read_patient", "search_allergies"}
    assert purposes == {"treatment", "audit", None}
    assert len(cases) == 2 * 2 * 3 * 3 * 2  # roles x tools x purposes x scopes x sensitivity


def test_duplicate_inputs_are_replayed_once():
    inp = {"action": {"tool": "read_patient"}}
    cases = unique_cases([Case("fixture", "a", inp), Case("replay", "b", dict(inp))])
    assert [c.label for c in cases] == ["a"]


def call(request_id, *, time="2026-11-02T09:00:00.000Z", role="nurse"):
    return {
        "subject": {"claims": {"roles": [role]}},
        "action": {"tool": "read_patient"},
        "context": {"purpose": "treatment", "request_id": request_id, "time": time},
    }


class Counting:
    """A stand-in evaluator that decides by role and counts the inputs it was asked to decide."""

    def __init__(self, allow_roles):
        self.allow_roles, self.decided, self.workers, self.chunk_size = allow_roles, 0, 1, 3

    def decide_chunk(self, inputs):
        self.decided += len(inputs)
        return [ALLOW if x["subject"]["claims"]["roles"][0] in self.allow_roles else DENY for x in inputs]


def test_calls_that_differ_only_in_their_request_id_are_decided_once_and_each_reported():
    cases = [Case("replay", f"t#{i}", call(f"req-{i}", role=("nurse", "clerk")[i % 2])) for i in range(10)]
    base, head = Counting({"nurse"}), Counting({"nurse", "clerk"})
    report = diff_cases(cases, base, head, base_label="b", head_label="h")
    assert (base.decided, head.decided) == (2, 2)
    assert report.evaluated == 10
    assert report.count("widening") == 5
    assert sorted(c.case.label for c in report.changes) == sorted(f"t#{i}" for i in range(1, 10, 2))


def test_calls_at_other_instants_are_decided_apart():
    assert decision_key(call("a")) == decision_key(call("b"))
    assert decision_key(call("a")) != decision_key(call("a", time="2026-11-02T09:00:00.001Z"))


def test_a_missing_or_null_request_id_is_not_taken_for_a_string_one():
    keys = {decision_key(call("a")), decision_key(call(None))}
    no_id = call("a")
    del no_id["context"]["request_id"]
    keys.add(decision_key(no_id))
    assert len(keys) == 3


# -- against the real OPA ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def widening(tmp_path_factory, opa_binary):
    """The diff of policies/ → a copy where the nurse role gains MedicationStatement (grid + fixtures)."""
    head_dir = policies_with_nurse_reading_medications(tmp_path_factory.mktemp("widened"))
    base, head = BatchEvaluator(POLICIES), BatchEvaluator(head_dir)
    configs = [head.query("data.mcp_fhir.config"), base.query("data.mcp_fhir.config")]
    cases = unique_cases([*fixture_cases([POLICIES / "fixtures"]), *grid_cases(configs)])
    return cases, base, head


def effective_purpose(inp):
    """The test's own reading of the shipped data: a declared purpose, or the one the credential binds;
    None when they disagree (PURPOSE_MISMATCH) or neither is given."""
    declared, bound = inp["context"]["purpose"], inp["subject"]["claims"].get("purpose_of_use")
    if declared and bound and declared != bound:
        return None
    return declared or bound


def nurse_grid(cases):
    return [c for c in cases if c.source == "grid" and c.input["subject"]["claims"]["roles"] == ["nurse"]]


@pytest.mark.timeout(900)  # about 19,000 decisions by the real OPA, on a shared 2-core machine
def test_a_role_gaining_a_resource_type_is_reported_as_exactly_those_widenings(widening):
    cases, base, head = widening
    report = diff_cases(cases, base, head, base_label="base", head_label="head")
    widenings = [c for c in report.changes if c.classification == "widening"]
    assert widenings, "the diff did not see the widening"
    for change in widenings:
        inp = change.case.input
        assert change.role == "nurse"
        assert inp["action"]["resource_type"] == "MedicationStatement"
        assert effective_purpose(inp) == "treatment"
        assert change.purpose in ("treatment", "(none)")  # declared, or bound by the credential only
        assert change.kinds == ("deny_to_allow",)
        assert change.reason == "ROLE_NOT_PERMITTED"
    # exactly: every nurse grid input for MedicationStatement under treatment with covering scopes and no
    # break-glass (which the nurse may not invoke) changes, and nothing else widens
    # (among the claim variants: bound to the requested patient, or to treatment, declared or not)
    expected = {
        c.label for c in cases
        if c.source == "grid" and c.input["subject"]["claims"]["roles"] == ["nurse"]
        and c.input["action"]["resource_type"] == "MedicationStatement"
        and effective_purpose(c.input) == "treatment" and c.input["subject"]["scopes"]
        and c.input["context"]["break_glass"] is None
        and c.input["subject"]["claims"].get("patient") in (None, GRID_PATIENT)
    }  # fmt: skip
    assert {c.case.label for c in widenings if c.case.source == "grid"} == expected
    assert any(c.case.source == "fixture" for c in widenings)
    assert report.count("narrowing") == 0
    assert report.unapproved_widenings == len(widenings)
    assert not report.ok
    assert {g.tool for g in report.groups if g.classification == "widening"} == {
        "search_medication_statements", "patient_summary", "refresh",
    }  # fmt: skip


@pytest.mark.timeout(600)
def test_the_mirror_image_change_is_reported_as_narrowings_only(widening):
    cases, base, head = widening
    report = diff_cases(nurse_grid(cases), head, base, base_label="head", head_label="base")
    assert report.count("widening") == 0
    assert report.count("narrowing") > 0
    assert all(c.kinds == ("allow_to_deny",) for c in report.changes if c.classification == "narrowing")
    assert report.ok  # narrowings need no approval


@pytest.mark.timeout(600)
def test_an_active_approval_covers_the_widening_and_an_expired_one_does_not(widening):
    cases, base, head = widening
    # purpose "*": the grid also widens calls that declare no purpose but whose credential binds treatment
    entry = {"id": "APR-1", "role": "nurse", "tool": "*", "purpose": "*", "kind": "deny_to_allow",
             "reviewer": "privacy@example.org", "ticket": "SEC-1", "expires": "2026-12-31"}  # fmt: skip
    approvals = Approvals.from_mapping({"approvals": [entry]})
    nurse_only = nurse_grid(cases)
    approved = diff_cases(nurse_only, base, head, base_label="b", head_label="h", approvals=approvals,
                          today=date(2026, 6, 1))  # fmt: skip
    assert approved.count("widening") > 0
    assert approved.ok
    assert all("APR-1" in " ".join(g.approved_by) for g in approved.groups if g.classification == "widening")
    expired = diff_cases(nurse_only, base, head, base_label="b", head_label="h", approvals=approvals,
                         today=date(2027, 1, 1))  # fmt: skip
    assert not expired.ok
    assert expired.expired_approvals == ["APR-1"]
