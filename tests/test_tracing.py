"""`mcp_fhir.tracing`: one root span per tool call, a child per step, the caller's W3C trace as parent, and no
attribute off the allow-list (so no PHI) in any span, whatever the caller passes.

These tests record spans with a small recording tracer (the API's `start_as_current_span` contract);
`tests/test_tracing_sdk.py` runs the same flow through the OpenTelemetry SDK's in-memory exporter when the
SDK (the `tracing` extra) is installed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.trace import SpanKind, StatusCode

from mcp_fhir import tracing
from mcp_fhir._exceptions import ConfigError, PolicyUnavailable

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
PHI = ("pat-8812", "Jane Citizen", "HIV viral load", "1974-02-11")


@dataclass
class RecordedSpan:
    name: str
    context: Any
    kind: SpanKind
    attributes: dict[str, Any]
    parent: RecordedSpan | None
    record_exception: bool
    status: Any = None
    events: list[Any] = field(default_factory=list)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_status(self, status: Any) -> None:
        self.status = status

    def is_recording(self) -> bool:
        return True


class RecordingTracer:
    def __init__(self) -> None:
        self.spans: list[RecordedSpan] = []
        self._stack: list[RecordedSpan] = []

    @contextlib.contextmanager
    def start_as_current_span(
        self,
        name: str,
        context: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Iterator[RecordedSpan]:
        span = RecordedSpan(
            name,
            context,
            kind,
            dict(attributes or {}),
            self._stack[-1] if self._stack else None,
            record_exception,
        )
        self.spans.append(span)
        self._stack.append(span)
        try:
            yield span
        finally:
            self._stack.pop()


@pytest.fixture
def recorder() -> RecordingTracer:
    return RecordingTracer()


@pytest.fixture
def tracer(recorder: RecordingTracer) -> tracing.CallTracer:
    return tracing.CallTracer(recorder)


def everything_recorded(recorder: RecordingTracer) -> str:
    return repr([(s.name, s.attributes, s.status) for s in recorder.spans])


def run_a_call(tracer: tracing.CallTracer, headers: dict[str, str] | None = None) -> None:
    with tracer.tool_call("search_observations", headers=headers, request_id="req-1"):
        for step in tracing.STEPS:
            with tracer.span(step) as span:
                if step == "decide":
                    tracing.annotate(span, **{"policy.allow": True, "policy.reason_codes": ["allowed"]})


def test_one_tool_call_is_one_root_span_with_a_child_span_per_step_in_order(tracer, recorder):
    run_a_call(tracer)
    root, *steps = recorder.spans
    assert (root.name, root.kind, root.parent) == ("mcp.tool_call", SpanKind.SERVER, None)
    assert root.attributes == {"mcp.tool": "search_observations", "mcp.request_id": "req-1"}
    assert [s.name for s in steps] == [f"mcp.{step}" for step in tracing.STEPS]
    assert all(s.parent is root for s in steps)
    decide = steps[tracing.STEPS.index("decide")]
    assert decide.attributes == {
        "mcp.step": "decide",
        "policy.allow": True,
        "policy.reason_codes": ["allowed"],
    }


def test_attributes_off_the_allow_list_are_dropped_and_counted_so_no_phi_reaches_a_span(tracer, recorder):
    with tracer.tool_call("read_patient"):
        with tracer.span(
            "fetch", patient_id=PHI[0], **{"fhir.backend": "epic", "patient.name": PHI[1], "query": PHI[2]}
        ) as span:
            tracing.annotate(span, birth_date=PHI[3], **{"fhir.result_count": 3})
    fetch = recorder.spans[1]
    assert fetch.attributes == {
        "mcp.step": "fetch",
        "fhir.backend": "epic",
        "fhir.result_count": 3,
        tracing.DROPPED: 4,  # three at the span's start, one more from annotate
    }
    assert not any(value in everything_recorded(recorder) for value in PHI)


def test_a_value_that_is_not_a_scalar_or_a_list_of_codes_is_dropped_even_under_an_allowed_key(
    tracer, recorder
):
    resource = {"resourceType": "Patient", "name": [{"text": PHI[1]}]}
    with tracer.tool_call("read_patient"):
        with tracer.span("enforce", **{"policy.obligations": resource, "fhir.resource_type": [resource]}):
            pass
    assert recorder.spans[1].attributes == {"mcp.step": "enforce", tracing.DROPPED: 2}
    assert PHI[1] not in everything_recorded(recorder)


def test_long_strings_and_long_lists_are_bounded():
    kept, dropped = tracing.safe_attributes(
        {"error.code": "x" * 10_000, "policy.reason_codes": ["c"] * (tracing.MAX_LIST_ITEMS + 1)}
    )
    assert kept == {"error.code": "x" * tracing.MAX_ATTRIBUTE_CHARS} and dropped == 1


def test_an_unknown_step_is_refused(tracer):
    with pytest.raises(ValueError, match="unknown call-path step"):
        with tracer.span("exfiltrate"):
            pass


def test_an_exception_marks_the_span_with_its_type_and_code_only_never_its_message(tracer, recorder):
    with pytest.raises(PolicyUnavailable):
        with tracer.tool_call("read_patient"), tracer.span("decide"):
            raise PolicyUnavailable(f"OPA failed for patient {PHI[0]}")
    root, decide = recorder.spans
    for span in (root, decide):
        assert span.record_exception is False
        assert (span.status.status_code, span.status.description) == (StatusCode.ERROR, "PolicyUnavailable")
        assert span.attributes["error.code"] == "opa_unavailable"
        assert span.attributes["error.type"] == "PolicyUnavailable"
    assert PHI[0] not in everything_recorded(recorder)


def test_the_callers_w3c_trace_context_is_the_parent_of_the_tool_call(tracer, recorder):
    run_a_call(tracer, headers={"Traceparent": TRACEPARENT, "Content-Type": "application/json"})
    parent = trace.get_current_span(recorder.spans[0].context).get_span_context()
    assert (format(parent.trace_id, "032x"), format(parent.span_id, "016x")) == (TRACE_ID, PARENT_SPAN_ID)
    assert parent.is_remote


@pytest.mark.parametrize(
    "headers",
    [None, {}, {"traceparent": "not-a-traceparent"}, {"traceparent": f"00-{'0' * 32}-{PARENT_SPAN_ID}-01"}],
    ids=["none", "empty", "malformed", "all-zero-trace-id"],
)
def test_without_a_valid_traceparent_the_tool_call_starts_a_new_trace(tracer, recorder, headers):
    run_a_call(tracer, headers=headers)
    assert recorder.spans[0].context is None


def test_baggage_is_never_read_from_the_request():
    context = tracing.extract_context({"traceparent": TRACEPARENT, "baggage": f"patient={PHI[0]}"})
    assert context is not None and baggage.get_all(context) == {}


def test_the_module_functions_work_on_the_default_no_op_provider():
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("an SDK provider was installed earlier in this process (OpenTelemetry allows one per process)")
    with tracing.tool_call("read_patient", headers={"traceparent": TRACEPARENT}) as root:
        with tracing.span("audit", patient_id=PHI[0]) as span:
            assert not span.is_recording()
    assert not root.is_recording()


# --- settings ------------------------------------------------------------------------------------------


def test_tracing_is_off_by_default_and_configuring_it_off_installs_nothing():
    settings = tracing.TracingSettings.from_mapping(None)
    assert settings.enabled is False
    assert tracing.configure_tracing(settings) is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"otlp_endpoint": "collector:4318"}, "tracing.otlp_endpoint"),
        ({"otlp_endpoint": "ftp://collector/v1/traces"}, "tracing.otlp_endpoint"),
        ({"sample_ratio": 1.5}, "tracing.sample_ratio"),
        ({"export_timeout": 0}, "tracing.export_timeout"),
        ({"service_name": ""}, "tracing.service_name"),
        ({"exporter": "zipkin"}, "tracing.exporter"),
    ],
)
def test_a_bad_tracing_setting_is_a_config_error_naming_its_key(data, key):
    with pytest.raises(ConfigError) as caught:
        tracing.TracingSettings.from_mapping(data)
    assert (caught.value.code, caught.value.key) == ("config_invalid", key)


def test_exporter_headers_come_from_the_named_variable():
    settings = tracing.TracingSettings(otlp_headers_env="OTLP_HEADERS")
    assert settings.headers({"OTLP_HEADERS": "authorization=Bearer abc, x-tenant=t1"}) == {
        "authorization": "Bearer abc",
        "x-tenant": "t1",
    }
    for environ in ({}, {"OTLP_HEADERS": "no-equals-sign"}):
        with pytest.raises(ConfigError) as caught:
            settings.headers(environ)
        assert caught.value.key == "tracing.otlp_headers_env"


def test_enabling_tracing_without_the_sdk_installed_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails as if not installed
    with pytest.raises(ConfigError) as caught:
        tracing.configure_tracing(tracing.TracingSettings(enabled=True))
    assert caught.value.key == "tracing.enabled"
