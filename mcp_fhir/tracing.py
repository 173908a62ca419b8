"""OpenTelemetry traces: one trace per tool call, one span per step. Off by default; PHI never leaves in a span.

The call path instruments with the OpenTelemetry **API** only (`opentelemetry-api`, already a dependency
of the `mcp` SDK): with tracing off, the API's no-op tracer makes every span free. `configure_tracing`
installs the **SDK** and an OTLP/HTTP exporter when `tracing.enabled` is true; the SDK comes with the
`tracing` extra (`pip install 'mcp-fhir[tracing]'`).

How the call path uses it (one trace per tool call, the steps as children)::

    with tracing.tool_call(tool, headers=http_headers, request_id=request_id):
        with tracing.span("authenticate", **{"auth.method": subject.authn}):
            ...
        with tracing.span("decide") as s:
            decision = await app.decide(decision_input)
            tracing.annotate(s, **{"policy.allow": decision.allow, "policy.reason_codes": decision.reason_codes,
                                   "policy.decision_id": decision.decision_id})
        with tracing.span("fetch", **{"fhir.backend": backend, "fhir.resource_type": "Observation"}):
            ...
        with tracing.span("enforce"): ...
        with tracing.span("audit"): ...

PHI cannot leak through a span, whatever a caller passes:

* an attribute whose key is not in `ALLOWED_ATTRIBUTES` is dropped (no patient id, name, query value,
  note text or argument has a key there), and so is a value that is not a scalar or a list of scalars;
  a string value is cut to `MAX_ATTRIBUTE_CHARS`; the number dropped is kept as `mcp.attributes_dropped`;
* an exception inside a span is not recorded (its message may quote data): the span's status is ERROR
  with the exception's type name only;
* from the incoming request only the W3C `traceparent`/`tracestate` headers are read, never `baggage`.

The allow-list and the PHI rules are hand-written: OpenTelemetry has attribute *limits* (count, length)
but no attribute allow-list, and a span processor that filters would run after the attributes were set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mcp_fhir._exceptions import ConfigError
from mcp_fhir._version import __version__

INSTRUMENTATION = "mcp_fhir"
STEPS = ("authenticate", "decide", "fetch", "enforce", "audit")
ROOT_SPAN = "mcp.tool_call"
MAX_ATTRIBUTE_CHARS = 256
MAX_LIST_ITEMS = 64
DROPPED = "mcp.attributes_dropped"

# Finite, PHI-free facts about a call. A key here must never carry a patient id, a name, a FHIR query
# value, clinical text or a tool argument. Add to it only with a review of what the value can hold.
ALLOWED_ATTRIBUTES = frozenset(
    {
        "mcp.tool",
        "mcp.request_id",
        "mcp.step",
        "auth.method",
        "auth.result",
        "policy.allow",
        "policy.reason_codes",
        "policy.decision_id",
        "policy.revision",
        "policy.obligations",
        "fhir.backend",
        "fhir.operation",
        "fhir.resource_type",
        "fhir.result_count",
        "fhir.withheld_count",
        "fhir.pages",
        "cache.outcome",
        "http.response.status_code",
        "error.code",
        "error.type",
        "audit.sink",
        "audit.result",
    }
)

_PROPAGATOR = TraceContextTextMapPropagator()  # traceparent and tracestate only: never baggage


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """`tracing:` in the config. Off unless `enabled`; OTLP/HTTP to `otlp_endpoint` when on."""

    enabled: bool = False
    service_name: str = "mcp-fhir"
    otlp_endpoint: str | None = None  # e.g. http://collector:4318/v1/traces; None: the SDK's env defaults
    otlp_headers_env: str | None = None  # NAME of a variable holding "key=value,key2=value2" (a token)
    sample_ratio: float = 1.0
    export_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.otlp_endpoint is not None:
            parts = urlsplit(self.otlp_endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("tracing.otlp_endpoint", "must be an http(s) URL with a host")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError("tracing.sample_ratio", "must be between 0 and 1")
        if not 0 < self.export_timeout <= 120:
            raise ConfigError("tracing.export_timeout", "must be between 0 and 120 seconds")
        if not self.service_name or len(self.service_name) > 128:
            raise ConfigError("tracing.service_name", "must be 1-128 characters")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TracingSettings:
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"tracing.{unknown[0]}", "unknown key")
        return cls(**data)

    def headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The exporter's headers from the named variable (secrets stay out of the config file)."""
        if self.otlp_headers_env is None:
            return {}
        raw = (environ if environ is not None else os.environ).get(self.otlp_headers_env)
        if raw is None:
            raise ConfigError(
                "tracing.otlp_headers_env", f"environment variable {self.otlp_headers_env} is not set"
            )
        out = {}
        for item in filter(None, (p.strip() for p in raw.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError("tracing.otlp_headers_env", "must hold key=value pairs separated by commas")
            out[key.strip()] = value.strip()
        return out


def configure_tracing(settings: TracingSettings, *, exporter: Any = None) -> Any:
    """Install the SDK's tracer provider (batching to OTLP/HTTP, or to `exporter`); None when tracing is off.

    Returns the provider: call its `shutdown()` at exit to flush. Raises `ConfigError` when the SDK (the
    `tracing` extra) is not installed.
    """
    if not settings.enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise ConfigError(
            "tracing.enabled", "needs the tracing extra: pip install 'mcp-fhir[tracing]'"
        ) from None
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                "tracing.enabled", "needs the tracing extra: pip install 'mcp-fhir[tracing]'"
            ) from None
        exporter = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, headers=settings.headers(), timeout=settings.export_timeout
        )
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name, "service.version": __version__}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def extract_context(headers: Mapping[str, str] | None) -> Context | None:
    """The caller's W3C trace context (`traceparent`, `tracestate`), or None. Header names in any case."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
    if "traceparent" not in lowered:
        return None
    context = _PROPAGATOR.extract(lowered)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def safe_attributes(attributes: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The attributes that may go into a span, and how many were dropped."""
    kept: dict[str, Any] = {}
    dropped = 0
    for key, value in attributes.items():
        clean = _clean_value(value) if key in ALLOWED_ATTRIBUTES else None
        if clean is None:
            dropped += 1
        else:
            kept[key] = clean
    return kept, dropped


def _clean_value(value: Any) -> Any:
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:MAX_ATTRIBUTE_CHARS]
    if isinstance(value, Sequence | frozenset | set) and not isinstance(value, bytes | bytearray):
        items = sorted(value, key=str) if isinstance(value, frozenset | set) else list(value)
        if len(items) > MAX_LIST_ITEMS or not all(isinstance(i, str) for i in items):
            return None  # lists hold codes (reason codes, resource types), never nested data
        return [i[:MAX_ATTRIBUTE_CHARS] for i in items]
    return None


def annotate(span: Any, **attributes: Any) -> None:
    """Add attributes to a span, through the same allow-list."""
    if not span.is_recording():  # tracing off: no attribute work on the call path
        return
    kept, dropped = safe_attributes(attributes)
    if kept:
        span.set_attributes(kept)
    if dropped:
        before = (getattr(span, "attributes", None) or {}).get(DROPPED, 0)  # an SDK span can be read
        span.set_attribute(DROPPED, before + dropped)


class CallTracer:
    """Spans for the call path. The default instance uses the global tracer provider (no-op until configured)."""

    def __init__(self, tracer: Any = None) -> None:
        self._tracer = tracer if tracer is not None else trace.get_tracer(INSTRUMENTATION, __version__)

    @contextlib.contextmanager
    def tool_call(
        self, tool: str, *, headers: Mapping[str, str] | None = None, request_id: str | None = None
    ) -> Iterator[Any]:
        """The root span of one tool call, a child of the caller's trace when the request carried one."""
        attributes = {"mcp.tool": tool, "mcp.request_id": request_id} if request_id else {"mcp.tool": tool}
        with self._span(ROOT_SPAN, attributes, context=extract_context(headers), kind=SpanKind.SERVER) as s:
            yield s

    @contextlib.contextmanager
    def span(self, step: str, **attributes: Any) -> Iterator[Any]:
        """A child span for one step of the call path (`STEPS`)."""
        if step not in STEPS:
            raise ValueError(f"unknown call-path step {step!r}; one of {', '.join(STEPS)}")
        with self._span(f"mcp.{step}", {"mcp.step": step, **attributes}) as s:
            yield s

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        attributes: Mapping[str, Any],
        *,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
            name,
            context=context,
            kind=kind,
            record_exception=False,  # an exception's message may quote data
            set_status_on_exception=False,
        ) as span:
            if span.is_recording():  # tracing off (the default): the allow-list is not even run
                kept, dropped = safe_attributes(attributes)
                if dropped:
                    kept[DROPPED] = dropped
                span.set_attributes(kept)
            try:
                yield span
            except BaseException as exc:
                code = getattr(exc, "code", None)
                span.set_attribute("error.type", type(exc).__name__)
                if isinstance(code, str):
                    span.set_attribute("error.code", code[:MAX_ATTRIBUTE_CHARS])
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise


TRACER = CallTracer()


def tool_call(
    tool: str, *, headers: Mapping[str, str] | None = None, request_id: str | None = None
) -> contextlib.AbstractContextManager[Any]:
    """`TRACER.tool_call`: the root span of one tool call."""
    return TRACER.tool_call(tool, headers=headers, request_id=request_id)


def span(step: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """`TRACER.span`: a step's span; attributes off the allow-list are dropped."""
    return TRACER.span(step, **attributes)
