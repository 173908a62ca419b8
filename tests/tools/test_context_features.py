"""Consent and activity in the call path (issue #21 §1, §3), over the in-package fakes.

The decision input carries `context.consent` / `context.activity` only when the feature is on;
consent is read under the id its source is keyed by, activity is counted before the decision and
a denial after it.
"""

from __future__ import annotations

from typing import Any

import pytest

from mcp_fhir._exceptions import PolicyDenied
from mcp_fhir.activity import MemoryActivity
from mcp_fhir.consent import ConsentReader, MemoryConsentStore
from mcp_fhir.policy.input import DecisionInput
from tests.tools.conftest import PATIENT, SUBJECT, allow_with, deny_with, make_harness, observation

ARGS: dict[str, Any] = {"patient_id": PATIENT, "purpose": "treatment"}
OPT_OUT = {
    "resourceType": "Consent",
    "id": "c1",
    "status": "active",
    "patient": {"reference": f"Patient/{PATIENT}"},
    "provision": {"type": "deny"},
}


class Recorder:
    """A policy that records every input and answers `answer`."""

    def __init__(self, answer: Any = None) -> None:
        self.inputs: list[dict[str, Any]] = []
        self.answer = answer or (lambda _i: allow_with())

    def __call__(self, opa_input: Any) -> Any:
        self.inputs.append(dict(opa_input))
        return self.answer(opa_input)


class BrokenCounters:
    async def observe(self, subject: str, patient: str | None) -> Any:
        raise ConnectionError("redis is down")

    async def denied(self, subject: str) -> None:
        raise ConnectionError("redis is down")

    async def aclose(self) -> None:
        return None


class FailingStore:
    async def directives(self, patient: str) -> list[dict[str, Any]]:
        raise ConnectionError("down")


def _input(**kw: Any) -> DecisionInput:
    base: dict[str, Any] = {
        "subject": SUBJECT,
        "tool": "search_observations",
        "operation": "search",
        "resource_type": "Observation",
        "patient": "p1",
        "params": {},
        "purpose": "treatment",
        "break_glass_reason": None,
        "backend": "b",
        "request_id": "r",
        "time": "2026-01-01T00:00:00.000Z",
    }
    return DecisionInput(**(base | kw))


def test_without_consent_or_activity_the_context_has_exactly_the_contract_keys():
    assert set(_input().to_opa()["context"]) == {"purpose", "time", "break_glass", "backend", "request_id"}


def test_consent_and_activity_appear_in_the_context_only_when_set():
    ctx = _input(consent={"status": "ok", "provisions": []}, activity={"60": {"calls": 1}}).to_opa()[
        "context"
    ]
    assert ctx["consent"] == {"status": "ok", "provisions": []}
    assert ctx["activity"] == {"60": {"calls": 1}}
    assert "activity" not in _input(consent={"status": "ok", "provisions": []}).to_opa()["context"]


def test_the_repr_of_an_input_with_consent_names_no_provision():
    assert "c1" not in repr(_input(consent={"status": "ok", "provisions": [{"consent": "c1"}]}))


async def test_with_consent_off_the_decision_input_has_no_consent_key():
    policy = Recorder()
    h = make_harness(policy, resources=[observation("o1")])
    await h.run("search_observations", **ARGS)
    assert "consent" not in policy.inputs[0]["context"]
    assert "activity" not in policy.inputs[0]["context"]


async def test_the_patients_directives_reach_the_decision_normalised():
    store = MemoryConsentStore()
    await store.put(OPT_OUT)
    policy = Recorder()
    h = make_harness(policy, resources=[observation("o1")], consent=ConsentReader(store))
    await h.run("search_observations", **ARGS)
    consent = policy.inputs[0]["context"]["consent"]
    assert consent["status"] == "ok"
    assert [(p["consent"], p["type"]) for p in consent["provisions"]] == [("c1", "deny")]


async def test_an_unreadable_consent_reaches_the_policy_as_unavailable():
    policy = Recorder(lambda _i: deny_with("CONSENT_UNAVAILABLE"))
    h = make_harness(policy, consent=ConsentReader(FailingStore()))
    with pytest.raises(PolicyDenied) as err:
        await h.run("search_observations", **ARGS)
    assert policy.inputs[0]["context"]["consent"] == {"status": "unavailable", "provisions": []}
    assert err.value.reasons == ["CONSENT_UNAVAILABLE"]
    assert h.sink.records[-1].reason_codes == ("CONSENT_UNAVAILABLE",)


async def test_a_call_about_no_patient_reads_no_consent():
    policy = Recorder()
    h = make_harness(policy, consent=ConsentReader(FailingStore()))
    with pytest.raises(PolicyDenied):  # the fake allow lacks audit_patients: denied, but decided
        await h.run("search_audit_log", patient_id=PATIENT)
    assert "consent" not in policy.inputs[0]["context"]


async def test_a_written_consent_is_read_afresh_after_invalidation():
    store = MemoryConsentStore()
    reader = ConsentReader(store, ttl_seconds=3600)
    policy = Recorder()
    h = make_harness(policy, resources=[observation("o1")], consent=reader)
    await h.run("search_observations", **ARGS)
    reader.invalidate(await store.put(OPT_OUT))
    await h.run("search_observations", **ARGS)
    assert [len(i["context"]["consent"]["provisions"]) for i in policy.inputs] == [0, 1]


async def test_activity_counts_this_call_before_its_decision_and_a_denial_after():
    policy = Recorder(lambda i: deny_with("X") if i["resource"]["patient"] == "pat-9" else allow_with())
    h = make_harness(policy, resources=[observation("o1")], activity=MemoryActivity((60, 600)))
    await h.run("search_observations", **ARGS)
    with pytest.raises(PolicyDenied):
        await h.run("search_observations", **{**ARGS, "patient_id": "pat-9"})
    await h.run("search_observations", **ARGS)
    counts = [i["context"]["activity"]["600"] for i in policy.inputs]
    assert counts == [
        {"calls": 1, "distinct_patients": 1, "denials": 0},
        {"calls": 2, "distinct_patients": 2, "denials": 0},
        {"calls": 3, "distinct_patients": 2, "denials": 1},
    ]


async def test_failing_counters_reach_the_policy_as_unavailable():
    policy = Recorder(lambda _i: deny_with("ACTIVITY_UNAVAILABLE"))
    h = make_harness(policy, activity=BrokenCounters())
    with pytest.raises(PolicyDenied):
        await h.run("search_observations", **ARGS)
    assert policy.inputs[0]["context"]["activity"] == {"status": "unavailable"}
    assert h.sink.records[-1].result == "denied"
