"""`mcp_fhir.tracing` through the OpenTelemetry SDK and its in-memory exporter (the `tracing` extra).

Skipped where the SDK is not installed: the shared development environment pins `opentelemetry-api` to a
version the registry has no matching SDK for (see docs/operator-guide.md, Traces).
"""

from __future__ import annotations

import pytest

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402

from mcp_fhir import tracing  # noqa: E402

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_tool_call_exports_one_trace_with_a_span_per_step_and_only_allowed_attributes():
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracing.CallTracer(provider.get_tracer("test"))
    with tracer.tool_call("read_patient", headers={"traceparent": TRACEPARENT}, request_id="r1"):
        for step in tracing.STEPS:
            with tracer.span(step, patient_id="pat-8812", **{"fhir.backend": "epic"}):
                pass
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "mcp.tool_call")
    steps = [s for s in spans if s.name != "mcp.tool_call"]
    assert [s.name for s in steps] == [f"mcp.{step}" for step in tracing.STEPS]
    assert {s.context.trace_id for s in spans} == {int("4bf92f3577b34da6a3ce929d0e0e4736", 16)}
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in steps)
    assert all("patient_id" not in s.attributes and s.attributes[tracing.DROPPED] == 1 for s in steps)


def test_configure_tracing_installs_a_batching_provider_that_exports_to_the_given_exporter():
    exporter = in_memory.InMemorySpanExporter()
    provider = tracing.configure_tracing(tracing.TracingSettings(enabled=True), exporter=exporter)
    tracer = tracing.CallTracer(provider.get_tracer("test"))
    with tracer.tool_call("read_patient"), tracer.span("decide"):
        pass
    provider.force_flush()
    assert {s.name for s in exporter.get_finished_spans()} == {"mcp.tool_call", "mcp.decide"}
    provider.shutdown()
