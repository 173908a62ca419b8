"""The Prometheus registry and every instrument the sidecar exports.

Metrics observe; they decide nothing. No label ever carries PHI or a patient id:
labels are tool names, backends, results, reason codes and states, all from finite sets.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from mcp_fhir._version import __version__

REGISTRY = CollectorRegistry(auto_describe=True)
# The client library's default collectors: process_* (CPU, memory, file descriptors, start time),
# python_info and python_gc_*. They are registered in the library's global registry too; each
# collector reads its own process, so registering it here as well exports the same series.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

DECISIONS = Counter(
    "mcp_fhir_decisions",
    "Policy decisions by result and reason code.",
    ["result", "reason"],
    registry=REGISTRY,
)
DECISION_LATENCY = Histogram(
    "mcp_fhir_decision_seconds", "Time to obtain a policy decision.", buckets=_FAST, registry=REGISTRY
)
TOOL_CALLS = Counter(
    "mcp_fhir_tool_calls", "Tool calls by tool and result.", ["tool", "result"], registry=REGISTRY
)
UPSTREAM_LATENCY = Histogram(
    "mcp_fhir_upstream_seconds",
    "EHR request latency by backend.",
    ["backend"],
    buckets=_SLOW,
    registry=REGISTRY,
)
UPSTREAM_STATUS = Counter(
    "mcp_fhir_upstream_responses",
    "EHR responses by backend and HTTP status.",
    ["backend", "status"],
    registry=REGISTRY,
)
CACHE_EVENTS = Counter(
    "mcp_fhir_cache",
    "Cache lookups by backend and outcome (hit, miss, stale).",
    ["backend", "outcome"],
    registry=REGISTRY,
)
RATE_LIMIT_WAITS = Histogram(
    "mcp_fhir_rate_limit_wait_seconds",
    "Time spent queued by the rate limiter.",
    ["backend"],
    buckets=_SLOW,
    registry=REGISTRY,
)
RATE_LIMIT_REJECTIONS = Counter(
    "mcp_fhir_rate_limit_rejections", "Calls rejected by the rate limiter.", ["backend"], registry=REGISTRY
)
BREAKER_STATE = Gauge(
    "mcp_fhir_circuit_state",
    "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.",
    ["backend"],
    registry=REGISTRY,
)
TOKEN_REFRESHES = Counter(
    "mcp_fhir_token_refreshes",
    "SMART Backend Services token requests by backend and outcome.",
    ["backend", "outcome"],
    registry=REGISTRY,
)
AUDIT_WRITE_LATENCY = Histogram(
    "mcp_fhir_audit_write_seconds",
    "Time for an audit record to become durable.",
    buckets=_FAST,
    registry=REGISTRY,
)
AUDIT_FAILURES = Counter(
    "mcp_fhir_audit_failures", "Audit records that could not be made durable.", registry=REGISTRY
)
AUDIT_ALERTS = Counter(
    "mcp_fhir_alerts",
    "Alerts raised by the policy or by the sidecar's burst detector.",
    ["alert"],
    registry=REGISTRY,
)
SHADOW_DIVERGENCES = Counter(
    "mcp_fhir_shadow_divergences",
    "Calls where the candidate policy disagreed with the active one.",
    ["kind"],
    registry=REGISTRY,
)
IDMAP_MISMATCHES = Counter(
    "mcp_fhir_idmap_mismatches",
    "Patient ids that could not be canonicalised.",
    ["backend"],
    registry=REGISTRY,
)
OPA_RESTARTS = Counter(
    "mcp_fhir_opa_restarts",
    "Restarts of the managed OPA child, by reason (exited: it died; reload: SIGHUP).",
    ["reason"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "mcp_fhir_build_info",
    "Always 1: the sidecar's version, the OPA version and the active policy revision as labels.",
    ["version", "opa_version", "policy_revision"],
    registry=REGISTRY,
)
UNKNOWN = "unknown"


def set_build_info(*, opa_version: str | None, policy_revision: str | None) -> None:
    """One `mcp_fhir_build_info` series: the current versions (the previous series is removed)."""
    BUILD_INFO.clear()
    BUILD_INFO.labels(__version__, opa_version or UNKNOWN, policy_revision or UNKNOWN).set(1)


set_build_info(opa_version=None, policy_revision=None)
