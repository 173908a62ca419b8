"""The decision input is exactly the contract in `policies/README.md`: four blocks, fixed keys, RFC 3339 UTC time."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.policy.input import decision_input, utc_now_rfc3339, visible_tools_input

CORPUS = Path(__file__).resolve().parents[2] / "policies" / "fixtures" / "decisions.json"
RFC3339_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SUBJECT = Subject(
    id="agent-1",
    authn="oauth",
    claims={"roles": ["clinician"], "patient": "Patient/p1"},
    scopes=("user/*.cruds",),
    on_behalf_of="Practitioner/123",
)
NOW = datetime(2026, 3, 4, 5, 6, 7, 891_234, tzinfo=UTC)


def _build(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "subject": SUBJECT,
        "tool": "search_observations",
        "operation": "search",
        "resource_type": "Observation",
        "patient": "p1",
        "params": {"category": "laboratory"},
        "purpose": "treatment",
        "break_glass_reason": None,
        "backend": "default",
        "request_id": "req-1",
        "now": NOW,
        **overrides,
    }
    return decision_input(**args)


def test_the_decision_input_is_exactly_the_documented_shape():
    assert _build() == {
        "subject": {
            "id": "agent-1",
            "authn": "oauth",
            "claims": {"roles": ["clinician"], "patient": "Patient/p1"},
            "scopes": ["user/*.cruds"],
            "on_behalf_of": "Practitioner/123",
        },
        "action": {"tool": "search_observations", "operation": "search", "resource_type": "Observation"},
        "resource": {"patient": "p1", "params": {"category": "laboratory"}},
        "context": {
            "purpose": "treatment",
            "time": "2026-03-04T05:06:07.891Z",
            "break_glass": None,
            "backend": "default",
            "request_id": "req-1",
        },
    }


def test_break_glass_is_an_object_with_its_reason_only_when_invoked():
    assert _build(break_glass_reason="cardiac arrest")["context"]["break_glass"] == {
        "reason": "cardiac arrest"
    }
    assert _build(break_glass_reason="")["context"]["break_glass"] is None


def test_a_patientless_call_sends_a_null_patient():
    assert _build(patient=None)["resource"] == {"patient": None, "params": {"category": "laboratory"}}


def test_the_input_is_json_and_holds_a_copy_of_the_params():
    params = {"category": "laboratory"}
    built = _build(params=params)
    params["category"] = "changed"
    assert built["resource"]["params"] == {"category": "laboratory"}
    assert json.loads(json.dumps(built)) == built


def test_the_input_has_the_same_keys_as_every_input_in_the_policy_corpus():
    built = _build()
    cases = [c["input"] for c in json.loads(CORPUS.read_text(encoding="utf-8"))]
    well_formed = [
        c for c in cases
        if isinstance(c, dict) and set(c) == {"subject", "action", "resource", "context"}
        and all(isinstance(c[k], dict) for k in c) and set(c["context"]) == set(built["context"])
    ]  # fmt: skip
    assert well_formed, "the corpus has no well-formed input to compare with"
    for case in well_formed:
        for block in ("subject", "action", "resource", "context"):
            assert set(case[block]) <= set(built[block]) | {"on_behalf_of"}, block


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 3, 4, 5, 6, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 4, 15, 6, 7, 999_999, tzinfo=timezone(timedelta(hours=10))),
        datetime(2026, 12, 31, 23, 59, 59, 1_000, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_time_is_rfc3339_utc_with_milliseconds(moment: datetime):
    text = utc_now_rfc3339(moment)
    assert RFC3339_UTC_MS.fullmatch(text)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert abs(parsed - moment) < timedelta(milliseconds=1)


def test_time_defaults_to_now():
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    stamp = datetime.fromisoformat(utc_now_rfc3339().replace("Z", "+00:00"))
    assert before <= stamp <= datetime.now(UTC)


def test_the_visible_tools_input_holds_the_subject_and_context_only():
    built = visible_tools_input(SUBJECT, backend="default")
    assert set(built) == {"subject", "context"}
    assert built["subject"] == SUBJECT.to_input()
    assert built["context"]["backend"] == "default"
    assert RFC3339_UTC_MS.fullmatch(built["context"]["time"])


def test_the_typed_input_is_what_opa_receives_and_its_repr_holds_no_patient_params_or_reason():
    from mcp_fhir.policy.input import DecisionInput

    typed = DecisionInput(
        subject=SUBJECT,
        tool="search_observations",
        operation="search",
        resource_type="Observation",
        patient="p1-secret",
        params={"code": "4548-4"},
        purpose="treatment",
        break_glass_reason="Unconscious patient in resus",
        backend="default",
        request_id="req-1",
        time=utc_now_rfc3339(NOW),
    )
    assert typed.to_opa() == _build(
        patient="p1-secret", params={"code": "4548-4"}, break_glass_reason="Unconscious patient in resus"
    )
    for text in (repr(typed), str(typed)):
        assert "p1-secret" not in text and "4548-4" not in text and "Unconscious" not in text
