"""The call path of one tool call, in order, in one place.

    authenticate → (arguments already validated) → canonicalise → decide → deny? → fetch
    → enforce → audit → respond

`CallPath.begin()` runs the steps up to the decision and, on a deny, writes the audit record
before raising. The tool then fetches and enforces, and `Call.commit()` writes the allowed
record; only when that record is durable does the result leave. Any failure after the
decision is audited as an error by `Call.fail()`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mcp.server.auth.middleware.auth_context import get_access_token

from mcp_fhir import metrics
from mcp_fhir._exceptions import (
    AuditUnavailable,
    AuthenticationError,
    MCPFhirError,
    PolicyDenied,
    ToolUnavailable,
)
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.logs import current_ids
from mcp_fhir.policy.engine import Decision
from mcp_fhir.policy.input import decision_input

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from mcp_fhir.context import AppContext

log = logging.getLogger("mcp_fhir.call")


def current_subject(app: AppContext) -> Subject:
    """Step 1: the authenticated caller: the bearer/API-key subject on HTTP, the configured identity on stdio."""
    access = get_access_token()
    if access is not None:
        return app.subject_from_access_token(access)
    if app.local_subject is not None:
        return app.local_subject
    raise AuthenticationError("no authenticated caller")


@dataclass
class Call:
    """One authorised call in flight: what was decided, and what the result held."""

    app: AppContext
    subject: Subject
    request_id: str
    tool: str
    resource_type: str
    operation: str
    patient: str | None
    backend_patient: str | None
    backend: str
    params: dict[str, Any]
    purpose: str | None
    break_glass_reason: str | None
    trace_id: str | None
    decision: Decision
    decision_input: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    _done: bool = False

    def _record(self, *, result: str, error_code: str | None = None, **counts: Any) -> AuditRecord:
        d = self.decision
        return AuditRecord(
            ts=utc_now_ms(),
            request_id=self.request_id,
            trace_id=self.trace_id,
            kind="access",
            result=result,
            subject_id=self.subject.id,
            on_behalf_of=self.subject.on_behalf_of,
            authn=self.subject.authn,
            tool=self.tool,
            resource_type=self.resource_type,
            operation=self.operation,
            patient=self.patient,
            backend_patient=self.backend_patient,
            backend=self.backend,
            scopes=self.subject.scopes,
            purpose=self.purpose,
            break_glass_reason=self.break_glass_reason,
            reason_codes=d.reason_codes,
            error_code=error_code,
            sensitivity=d.sensitivity,
            alerts=d.alerts,
            params=self.params,
            decision_id=d.decision_id,
            policy_revision=d.revision,
            decision_input=self.decision_input,
            extra=self.extra,
            **counts,
        )

    async def commit(self, *, returned: int, filtered: int, cache: str | None) -> None:
        """Step 8: the allowed record, durable before the result leaves. Raises `AuditUnavailable`."""
        await self.app.write_audit(
            self._record(result="allowed", returned_count=returned, filtered_count=filtered, cache=cache)
        )
        self._done = True
        metrics.TOOL_CALLS.labels(self.tool, "allowed").inc()

    async def fail(self, exc: MCPFhirError) -> None:
        """A failure after an allow: audited as an error (best effort; the error itself still goes out)."""
        if self._done:
            exc.audited = True
            return
        self._done = True
        metrics.TOOL_CALLS.labels(self.tool, "error").inc()
        try:
            await self.app.write_audit(self._record(result="error", error_code=exc.code))
            exc.audited = True
        except AuditUnavailable:
            log.error(
                "audit record for a failed call could not be written", extra={"request_id": self.request_id}
            )


class CallPath:
    """Runs steps 1 and 3 to 5 of every tool call, and audits whatever happens."""

    def __init__(self, app: AppContext) -> None:
        self.app = app

    async def audit_error(
        self,
        *,
        tool: str,
        exc: MCPFhirError,
        subject: Subject | None,
        request_id: str,
        patient: str | None = None,
        params: Mapping[str, Any] | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Audit a call that failed before any decision (bad arguments, unknown patient, no identity)."""
        metrics.TOOL_CALLS.labels(tool, "error").inc()
        record = AuditRecord(
            ts=utc_now_ms(),
            request_id=request_id,
            trace_id=trace_id,
            kind="access",
            result="error",
            tool=tool,
            subject_id=subject.id if subject else None,
            authn=subject.authn if subject else None,
            on_behalf_of=subject.on_behalf_of if subject else None,
            scopes=subject.scopes if subject else (),
            patient=patient,
            error_code=exc.code,
            params=dict(params or {}),
        )
        await self.app.write_audit(record)

    @asynccontextmanager
    async def begin(
        self,
        *,
        tool: str,
        resource_type: str,
        operation: str,
        patient: str | None,
        params: Mapping[str, Any],
        purpose: str | None,
        break_glass_reason: str | None,
        backend: str | None = None,
    ) -> AsyncIterator[Call]:
        app = self.app
        http_request_id, trace_id = current_ids()  # the same ids as this request's log lines
        request_id = http_request_id or uuid.uuid4().hex
        backend_name = backend or app.default_backend
        subject: Subject | None = None
        try:
            subject = current_subject(app)
            if tool in app.unavailable_tools:
                # The EHR did not grant the scopes this tool needs: say so, rather than pass on its 403.
                raise ToolUnavailable(
                    f"the EHR did not grant the scopes {tool} needs",
                    missing_scopes=list(app.unavailable_tools[tool]),
                )
            # An unmapped id raises UnknownPatient; the ID map counts it (IDMAP_MISMATCHES) and logs it.
            backend_patient = await app.idmap.backend_id(patient, backend_name) if patient else None
        except MCPFhirError as exc:
            exc.audited = True  # audited right here, before it leaves
            await self.audit_error(
                tool=tool,
                exc=exc,
                subject=subject,
                request_id=request_id,
                patient=patient,
                params=params,
                trace_id=trace_id,
            )
            raise
        d_input = decision_input(
            subject=subject,
            tool=tool,
            operation=operation,
            resource_type=resource_type,
            patient=patient,
            params=params,
            purpose=purpose,
            break_glass_reason=break_glass_reason,
            backend=backend_name,
            request_id=request_id,
        )
        decision = await app.decide(d_input)
        call = Call(
            app=app,
            subject=subject,
            request_id=request_id,
            tool=tool,
            resource_type=resource_type,
            operation=operation,
            patient=patient,
            backend_patient=backend_patient,
            backend=backend_name,
            params=dict(params),
            purpose=purpose,
            break_glass_reason=break_glass_reason,
            trace_id=trace_id,
            decision=decision,
            decision_input=d_input,
        )
        if not decision.allow:
            await app.write_audit(call._record(result="denied"))
            call._done = True
            metrics.TOOL_CALLS.labels(tool, "denied").inc()
            denied = PolicyDenied(decision.reasons, decision_id=decision.decision_id)
            denied.audited = True
            raise denied
        try:
            yield call
        except MCPFhirError as exc:
            await call.fail(exc)
            raise
        except Exception as exc:
            # A bug after the decision: audited with the decision's details, and it leaves as internal_error.
            log.error("tool %s failed after its decision: %s", tool, type(exc).__name__)
            internal = MCPFhirError("internal error")
            await call.fail(internal)
            raise internal from exc
        if not call._done:
            # A tool that returns without committing has a bug; its data must not leave unaudited.
            await call.fail(AuditUnavailable("the call ended without an audit record"))
            raise AuditUnavailable("the call ended without an audit record")
