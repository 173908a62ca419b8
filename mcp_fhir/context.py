"""The typed lifespan context: every long-lived client the call path uses, opened once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mcp_fhir import metrics
from mcp_fhir._exceptions import AuditUnavailable
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.ehr.client import EHRClient
from mcp_fhir.policy.engine import Decision, PolicyEngine, evaluate_failing_closed
from mcp_fhir.policy.input import visible_tools_input

log = logging.getLogger("mcp_fhir.context")


class AuditSink(Protocol):
    async def record(self, rec: AuditRecord) -> str: ...
    async def check(self) -> bool: ...
    async def query(
        self, f: Any, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]: ...
    async def close(self) -> None: ...


class PatientIds(Protocol):
    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str: ...


class IdentityIds:
    """The explicit `idmap.kind: identity` choice: canonical ids are the backend's FHIR ids."""

    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str:
        return canonical

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Limits:
    """Named, finite bounds on what one call may ask for and return."""

    default_page_size: int = 20
    max_page_size: int = 100
    max_range_days: int = 3660
    max_note_chars: int = 20_000
    summary_items_per_section: int = 10


@dataclass
class AppContext:
    """What the lifespan yields: the policy engine, EHR clients, patient-id map and audit trail."""

    engine: PolicyEngine
    backends: Mapping[str, EHRClient]
    default_backend: str
    idmap: PatientIds
    audit: AuditSink
    local_subject: Subject | None = None
    subject_from_access_token: Callable[[Any], Subject] = field(default=lambda _t: _no_verifier())
    shadow_engine: PolicyEngine | None = None
    limits: Limits = field(default_factory=Limits)
    continuation_key: bytes = b""
    flag_injection: bool = True
    enabled_tools: frozenset[str] = frozenset()
    unavailable_tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audit_healthy: bool = True
    audit_query: Callable[..., Any] = field(default=lambda **_k: None)

    def backend(self, name: str | None = None) -> EHRClient:
        return self.backends[name or self.default_backend]

    async def decide(self, decision_input: Mapping[str, Any]) -> Decision:
        """Step 4: ask the policy. Any failure is a deny with its own reason code (fail closed).

        A shadow (candidate) policy is asked at the same time, not after: shadow mode costs no latency.
        """
        if self.shadow_engine is None:
            decision = await self._active(decision_input)
        else:
            decision, candidate = await asyncio.gather(
                self._active(decision_input), evaluate_failing_closed(self.shadow_engine, decision_input)
            )
            await self._shadow(decision_input, decision, candidate)
        return decision

    async def _active(self, decision_input: Mapping[str, Any]) -> Decision:
        started = time.perf_counter()
        decision = await evaluate_failing_closed(self.engine, decision_input)
        metrics.DECISION_LATENCY.observe(time.perf_counter() - started)
        result = "allow" if decision.allow else "deny"
        for code in decision.reason_codes or ("none",):
            metrics.DECISIONS.labels(result, code).inc()
        return decision

    async def _shadow(self, decision_input: Mapping[str, Any], active: Decision, candidate: Decision) -> None:
        """Record where the candidate policy disagrees with the active one; enforce nothing.

        A broken candidate is a candidate deny: it never changes or breaks the active decision.
        """
        if (candidate.allow, candidate.obligations) == (active.allow, active.obligations):
            return
        kind = (
            "widening"
            if candidate.allow and not active.allow
            else ("narrowing" if active.allow and not candidate.allow else "obligations")
        )
        metrics.SHADOW_DIVERGENCES.labels(kind).inc()
        ctx = decision_input.get("context") or {}
        action = decision_input.get("action") or {}
        await self.write_audit(
            AuditRecord(
                ts=utc_now_ms(),
                request_id=str(ctx.get("request_id", "")),
                kind="shadow_divergence",
                result="allowed" if active.allow else "denied",
                tool=action.get("tool"),
                resource_type=action.get("resource_type"),
                operation=action.get("operation"),
                subject_id=(decision_input.get("subject") or {}).get("id"),
                reason_codes=active.reason_codes,
                decision_id=active.decision_id,
                policy_revision=active.revision,
                extra={
                    "divergence": kind,
                    "candidate": {
                        "allow": candidate.allow,
                        "reasons": list(candidate.reason_codes),
                        "obligations": candidate.obligations.to_dict(),
                    },
                },
            )
        )

    async def write_audit(self, record: AuditRecord) -> None:
        """Step 8: make the record durable. Failure is `AuditUnavailable`, and no data leaves."""
        try:
            await self.audit.record(record)
        except AuditUnavailable:
            self.audit_healthy = False
            raise
        except Exception as exc:
            self.audit_healthy = False
            metrics.AUDIT_FAILURES.inc()
            raise AuditUnavailable("the audit record could not be written") from exc
        self.audit_healthy = True

    async def visible_tools(self, subject: Subject) -> frozenset[str]:
        """The tools this subject may see: the policy's answer, minus tools the EHR did not grant scopes for."""
        try:
            visible = await self.engine.visible_tools(
                visible_tools_input(subject, backend=self.default_backend)
            )
        except Exception:
            return frozenset()
        return (visible & self.enabled_tools) - frozenset(self.unavailable_tools)


def _no_verifier() -> Subject:
    raise RuntimeError("no token verifier is configured")
