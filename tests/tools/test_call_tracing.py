"""Traces of the call path (issue #21 §4): one trace per tool call, a span per step, and no PHI in any
attribute. Run through `CallPath.run` over the in-package fakes, with a recording tracer (always) and with
the OpenTelemetry SDK's in-memory exporter (the SDK is a dev dependency, so CI runs both)."""

from __future__ import annotations

import json

import pytest

from mcp_fhir import tracing
from mcp_fhir._exceptions import PolicyDenied
from mcp_fhir.policy.engine import Obligations
from tests.test_tracing import RecordedSpan, RecordingTracer
from tests.tools.conftest import PATIENT, allow_with, deny_with, make_harness, observation

PHI = ("pat-1", "Wetherall", "collapsed in the car park", "laboratory|718-7")
ARGS = {"patient_id": PATIENT, "purpose": "treatment", "code": "laboratory|718-7"}
NOTE = {
    "patient_id": PATIENT,
    "title": "Wetherall review",
    "text": "Mr Wetherall was seen today.",
    "idempotency_key": "key-12345678",
    "purpose": "treatment",
}


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingTracer:
    tracer = RecordingTracer()
    monkeypatch.setattr(tracing, "TRACER", tracing.CallTracer(tracer))
    return tracer


def _no_phi(spans: list[RecordedSpan]) -> None:
    text = json.dumps([[s.name, s.attributes] for s in spans], default=str)
    for value in PHI:
        assert value not in text
    for s in spans:
        assert set(s.attributes) <= tracing.ALLOWED_ATTRIBUTES | {tracing.DROPPED}


async def test_an_allowed_call_is_one_trace_with_a_span_per_step_and_no_phi(recorded: RecordingTracer):
    h = make_harness(lambda _i: allow_with(decision_id="d-1"), resources=[observation("o1")])
    await h.run("search_observations", **ARGS)
    names = [s.name for s in recorded.spans]
    assert names == [
        "mcp.tool_call",
        "mcp.authenticate",
        "mcp.decide",
        "mcp.fetch",
        "mcp.enforce",
        "mcp.audit",
    ]
    root = recorded.spans[0]
    assert root.parent is None and all(s.parent is root for s in recorded.spans[1:])
    decide = recorded.spans[2].attributes
    assert (decide["policy.allow"], decide["policy.decision_id"]) == (True, "d-1")
    fetch = recorded.spans[3].attributes
    assert (fetch["fhir.backend"], fetch["fhir.resource_type"], fetch["cache.outcome"]) == (
        "fake",
        "Observation",
        "miss",
    )
    assert recorded.spans[4].attributes["fhir.result_count"] == 1
    _no_phi(recorded.spans)


async def test_a_denied_call_carries_its_reason_codes_and_error_code_and_no_phi(recorded: RecordingTracer):
    h = make_harness(lambda _i: deny_with("CONSENT_DENIED", decision_id="d-2"))
    with pytest.raises(PolicyDenied):
        await h.run("search_observations", **ARGS)
    names = [s.name for s in recorded.spans]
    assert names == ["mcp.tool_call", "mcp.authenticate", "mcp.decide", "mcp.audit"]
    assert recorded.spans[2].attributes["policy.reason_codes"] == ["CONSENT_DENIED"]
    assert recorded.spans[0].attributes["error.code"] == "policy_denied"
    _no_phi(recorded.spans)


async def test_a_note_with_free_text_and_a_break_glass_reason_leaves_none_in_a_span(
    recorded: RecordingTracer,
):
    h = make_harness(lambda _i: allow_with(Obligations(), decision_id="d-3"))
    await h.run("create_clinical_note", **NOTE)
    await h.run("search_observations", **ARGS, break_glass_reason="collapsed in the car park")
    assert len(recorded.spans) == 12
    _no_phi(recorded.spans)


async def test_with_the_sdk_in_memory_exporter_no_attribute_holds_phi(monkeypatch: pytest.MonkeyPatch):
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "TRACER", tracing.CallTracer(provider.get_tracer("test")))
    h = make_harness(lambda _i: allow_with(decision_id="d-4"), resources=[observation("o1")])
    await h.run("search_observations", **ARGS)
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1 and len(spans) == 6
    text = json.dumps([dict(s.attributes or {}) for s in spans], default=str)
    assert not any(v in text for v in PHI)
