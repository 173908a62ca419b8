"""The order of the call path: decide → deny-audit, fetch → enforce → audit → respond, and errors audited once."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from mcp_fhir import metrics
from mcp_fhir._exceptions import (
    AuditUnavailable,
    AuthenticationError,
    InvalidArgument,
    MCPFhirError,
    PolicyDenied,
    ToolUnavailable,
    UnknownPatient,
    UpstreamTimeout,
)
from mcp_fhir.logs import bind_request
from mcp_fhir.policy.engine import Decision, Obligations
from mcp_fhir.tools import CallPath
from tests.tools.conftest import (
    PATIENT,
    Harness,
    allow_with,
    deny_with,
    make_harness,
    observation,
    wait_until,
)

ARGS: dict[str, Any] = {"patient_id": PATIENT, "purpose": "treatment", "category": "laboratory"}


def _tool_calls(tool: str, result: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("mcp_fhir_tool_calls_total", {"tool": tool, "result": result})
        or 0.0
    )


async def _search(h: Harness, tool: str = "search_observations", **kwargs: Any) -> Any:
    return await h.run(tool, **{**ARGS, **kwargs})


class BrokenFetch:
    """A tool declaration whose fetch has a bug."""

    def __init__(self, h: Harness) -> None:
        self.tool = replace(h.tools["search_observations"], fetch=self._fetch)

    async def _fetch(self, call: Any, args: Any) -> Any:
        raise KeyError("a bug in a tool")


class UnknownIds:
    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str:
        raise UnknownPatient("no such patient")


async def test_a_deny_is_audited_before_the_error_leaves_and_the_ehr_is_never_called():
    h = make_harness(lambda _i: deny_with("ROLE_NOT_PERMITTED"), resources=[observation("o1")])
    with pytest.raises(PolicyDenied) as caught:
        await _search(h)
    assert (caught.value.code, caught.value.reasons, caught.value.decision_id) == (
        "policy_denied",
        ["ROLE_NOT_PERMITTED"],
        "d-deny",
    )
    assert [(r.result, r.reason_codes, r.decision_id) for r in h.sink.records] == [
        ("denied", ("ROLE_NOT_PERMITTED",), "d-deny")
    ]
    assert h.ehr.calls == []


async def test_a_deny_whose_audit_record_cannot_be_written_leaves_as_audit_unavailable():
    h = make_harness(lambda _i: deny_with("ROLE_NOT_PERMITTED"))
    h.sink.fail = True
    with pytest.raises(AuditUnavailable) as caught:
        await _search(h)
    assert caught.value.code == "audit_unavailable"


async def test_an_allowed_result_waits_until_its_audit_record_is_durable():
    h = make_harness(resources=[observation("o1")])
    h.sink.gate = asyncio.Event()
    task = asyncio.create_task(_search(h))
    await wait_until(lambda: h.sink.waiting == 1)
    assert h.ehr.calls == [("search", "Observation")]
    assert not task.done()  # the result is held until the record is durable
    h.sink.gate.set()
    result = await task
    assert result.structured_content["count"] == 1
    assert [(r.result, r.returned_count, r.decision_id) for r in h.sink.records] == [
        ("allowed", 1, "d-allow")
    ]


async def test_an_audit_failure_on_commit_is_audit_unavailable_and_no_data_leaves():
    h = make_harness(resources=[observation("o1")])
    h.sink.fail = True
    with pytest.raises(AuditUnavailable) as caught:
        await _search(h)
    assert caught.value.code == "audit_unavailable"
    assert h.sink.records == []


async def test_a_failure_after_the_decision_is_audited_once_as_an_error_with_its_code():
    h = make_harness()
    h.ehr.fail_with = UpstreamTimeout("slow")
    before = _tool_calls("search_observations", "error")
    with pytest.raises(UpstreamTimeout):
        await _search(h)
    assert [(r.result, r.error_code, r.decision_id) for r in h.sink.records] == [
        ("error", "upstream_timeout", "d-allow")
    ]
    assert _tool_calls("search_observations", "error") == before + 1


async def test_a_bug_after_the_decision_is_audited_with_the_decisions_details_as_internal_error():
    h = make_harness()
    with pytest.raises(MCPFhirError) as caught:
        await CallPath(h.app).run(BrokenFetch(h).tool, ARGS)
    assert caught.value.code == "internal_error"
    assert [(r.result, r.error_code, r.decision_id) for r in h.sink.records] == [
        ("error", "internal_error", "d-allow")
    ]


async def test_an_unknown_patient_is_audited_and_never_reaches_the_engine():
    h = make_harness(idmap=UnknownIds())
    with pytest.raises(UnknownPatient):
        await _search(h)
    assert h.engine.calls == [] and h.ehr.calls == []
    assert [(r.result, r.error_code, r.patient) for r in h.sink.records] == [
        ("error", "unknown_patient", PATIENT)
    ]


async def test_a_tool_the_ehr_did_not_grant_scopes_for_is_unavailable_and_never_reaches_the_engine():
    h = make_harness(unavailable_tools={"search_observations": ("system/Observation.rs",)})
    with pytest.raises(ToolUnavailable) as caught:
        await _search(h)
    assert caught.value.details["missing_scopes"] == ["system/Observation.rs"]
    assert h.engine.calls == [] and h.ehr.calls == []
    assert [(r.result, r.error_code) for r in h.sink.records] == [("error", "tool_unavailable")]


async def test_no_caller_is_unauthenticated_and_audited_without_a_subject():
    h = make_harness(local_subject=None)
    with pytest.raises(AuthenticationError):
        await _search(h)
    assert [(r.error_code, r.subject_id) for r in h.sink.records] == [("unauthenticated", None)]
    assert h.engine.calls == []


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("deny", id="deny"),
        pytest.param("upstream", id="upstream failure"),
        pytest.param("unknown_patient", id="unknown patient"),
        pytest.param("tool_unavailable", id="tool unavailable"),
    ],
)
async def test_every_error_is_audited_exactly_once(failure: str):
    overrides: dict[str, Any] = {}
    if failure == "unknown_patient":
        overrides["idmap"] = UnknownIds()
    if failure == "tool_unavailable":
        overrides["unavailable_tools"] = {"search_observations": ("s",)}
    h = make_harness(
        (lambda _i: deny_with("ROLE_NOT_PERMITTED")) if failure == "deny" else None,
        resources=[observation("o1")],
        **overrides,
    )
    if failure == "upstream":
        h.ehr.fail_with = UpstreamTimeout("slow")
    with pytest.raises(MCPFhirError):
        await _search(h)
    assert len(h.sink.records) == 1


async def test_a_bad_argument_is_audited_under_the_requests_id_before_the_engine_or_the_ehr():
    h = make_harness()
    with bind_request("req-bad-args-1", None), pytest.raises(InvalidArgument) as caught:
        await _search(h, date_from="not a date")
    assert (caught.value.code, caught.value.details["argument"]) == ("invalid_argument", "date_from")
    assert h.engine.calls == [] and h.ehr.calls == []
    assert [(r.result, r.error_code, r.request_id) for r in h.sink.records] == [
        ("error", "invalid_argument", "req-bad-args-1")
    ]


async def test_an_undeclared_argument_is_refused_by_name_and_audited():
    h = make_harness()
    with pytest.raises(InvalidArgument) as caught:
        await _search(h, _include="Patient:link")
    assert caught.value.details["argument"] == "_include"
    assert [(r.result, r.error_code) for r in h.sink.records] == [("error", "invalid_argument")]


async def test_every_record_of_one_request_carries_the_requests_id():
    h = make_harness(resources=[observation("o1")])
    with bind_request("req-one-id-22", None):
        await _search(h)
        with pytest.raises(InvalidArgument):
            await _search(h, page_size=0)
    assert [r.request_id for r in h.sink.records] == ["req-one-id-22", "req-one-id-22"]
    assert h.engine.calls[0]["context"]["request_id"] == "req-one-id-22"


async def test_the_decision_input_names_the_canonical_patient_and_the_call():
    h = make_harness()
    await _search(h)
    [d_input] = h.engine.calls
    assert d_input["action"] == {
        "tool": "search_observations",
        "operation": "search",
        "resource_type": "Observation",
    }
    assert d_input["resource"] == {"patient": PATIENT, "params": {"category": "laboratory"}}
    assert d_input["context"]["request_id"] == h.sink.records[0].request_id


def test_a_policy_error_becomes_a_deny_with_its_own_code_and_decision_id():
    from mcp_fhir._exceptions import PolicyTimeout

    decision = Decision.denied_by(PolicyTimeout("slow", decision_id="d-1"))
    assert (decision.allow, decision.reason_codes, decision.decision_id) == (False, ("opa_timeout",), "d-1")


async def test_an_unmapped_patient_is_counted_once_as_an_id_map_mismatch():
    from mcp_fhir._exceptions import UnknownPatient
    from mcp_fhir.ehr.idmap import MemoryIdMap

    h = make_harness()
    h.app.idmap = MemoryIdMap()  # knows no patient
    mismatches = metrics.IDMAP_MISMATCHES.labels(backend=h.app.default_backend)
    before = mismatches._value.get()
    with pytest.raises(UnknownPatient):
        await _search(h)
    assert mismatches._value.get() == before + 1
    assert [(r.result, r.error_code) for r in h.sink.records] == [("error", "unknown_patient")]


async def test_one_audited_call_is_one_observation_of_the_audit_write_histogram(tmp_path):
    from mcp_fhir.audit.settings import AuditSettings
    from mcp_fhir.audit.trail import build_trail

    trail = build_trail(AuditSettings(sink="file", path=str(tmp_path / "audit.jsonl"), writer_id="w"))
    await trail.start()
    h = make_harness(resources=[observation("o1")])
    h.app.audit = trail
    before = metrics.REGISTRY.get_sample_value("mcp_fhir_audit_write_seconds_count") or 0.0
    try:
        await _search(h)
    finally:
        await trail.close()
    assert metrics.REGISTRY.get_sample_value("mcp_fhir_audit_write_seconds_count") == before + 1


SECRET_PATIENT = "pat-secret-4711"
SECRET_REASON = "Cardiac arrest in ED bay 4, no consent possible"


async def test_no_call_object_repr_shows_a_patient_id_a_parameter_or_the_break_glass_reason():
    seen: list[Any] = []
    ob = Obligations(audit_patients=frozenset({SECRET_PATIENT}), present=frozenset({"audit_patients"}))
    h = make_harness(lambda _i: allow_with(ob), resources=[observation("o1", SECRET_PATIENT)])
    tool = h.tools["search_observations"]
    original = tool.fetch

    async def spy(call: Any, args: Any) -> Any:
        seen.extend([call, args, call.decision, call.obligations, *call.inputs.values(), call.tool])
        return await original(call, args)

    spying = replace(tool, fetch=spy)
    await CallPath(h.app).run(
        spying,
        {
            "patient_id": SECRET_PATIENT,
            "purpose": "treatment",
            "code": "http://loinc.org|4548-4",
            "break_glass_reason": SECRET_REASON,
        },
    )
    seen += [CallPath(h.app), h.app, h.app.decider, h.sink, *h.sink.records]
    for obj in seen:
        for text in (repr(obj), str(obj), f"{obj!r}", f"{obj}"):
            assert SECRET_PATIENT not in text, type(obj).__name__
            assert "4548-4" not in text, type(obj).__name__
            assert "Cardiac" not in text, type(obj).__name__


# Minimal valid arguments for every declared tool.
EVERY_TOOL: dict[str, dict[str, Any]] = {
    "read_patient": {"patient_id": PATIENT},
    "search_observations": {"patient_id": PATIENT},
    "search_medication_statements": {"patient_id": PATIENT},
    "search_medication_requests": {"patient_id": PATIENT},
    "search_conditions": {"patient_id": PATIENT},
    "search_encounters": {"patient_id": PATIENT},
    "search_procedures": {"patient_id": PATIENT},
    "search_allergies": {"patient_id": PATIENT},
    "list_documents": {"patient_id": PATIENT},
    "search_immunizations": {"patient_id": PATIENT},
    "patient_summary": {"patient_id": PATIENT},
    "read_document": {"patient_id": PATIENT, "document_id": "doc-1"},
    "create_clinical_note": {
        "patient_id": PATIENT,
        "title": "t",
        "text": "x",
        "idempotency_key": "key-every-tool",
    },
    "refresh": {"patient_id": PATIENT, "resource_type": "Observation"},
    "search_audit_log": {},
    "audit_disclosures": {"patient_id": PATIENT},
}


def test_every_declared_tool_is_in_this_table_and_in_the_catalogue():
    from mcp_fhir.catalog import CATALOGUE
    from mcp_fhir.tools import all_tools

    assert {t.name for t in all_tools()} == set(EVERY_TOOL) == set(CATALOGUE)


@pytest.mark.parametrize("name", sorted(EVERY_TOOL))
async def test_every_tool_denied_writes_one_denied_record_and_never_reaches_the_ehr(name: str):
    h = make_harness(lambda _i: deny_with("ROLE_NOT_PERMITTED"))
    with pytest.raises(PolicyDenied):
        await h.run(name, purpose="treatment", **EVERY_TOOL[name])
    assert [(r.result, r.tool) for r in h.sink.records] == [("denied", name)]
    assert h.ehr.calls == []


@pytest.mark.parametrize("name", sorted(EVERY_TOOL))
async def test_every_tool_allowed_writes_one_allowed_record_before_it_responds(name: str):
    ob = Obligations(present=frozenset({"audit_patients"}))
    doc = {"resourceType": "DocumentReference", "id": "doc-1", "subject": {"reference": f"Patient/{PATIENT}"}}
    h = make_harness(
        lambda _i: allow_with(ob),
        resources=[{"resourceType": "Patient", "id": PATIENT}, observation("o1"), doc],
    )
    result = await h.run(name, purpose="treatment", **EVERY_TOOL[name])
    assert not result.is_error
    assert [(r.result, r.tool) for r in h.sink.records] == [("allowed", name)]
    assert result.structured_content is not None
