"""Operational tools: `refresh` (bypass the cache, rate-limited per caller) and `search_audit_log`."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from datetime import date
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from mcp_fhir._exceptions import UpstreamRateLimited
from mcp_fhir.audit.export_fhir import to_audit_event
from mcp_fhir.catalog import PATIENT_TYPES
from mcp_fhir.policy.obligations import redact
from mcp_fhir.tools.clinical import READ_ONLY, app_of, current_subject_id, search_tool
from mcp_fhir.tools.params import FHIR_ID, BreakGlassReason, PatientId, Purpose, audit_params
from mcp_fhir.tools.pipeline import CallPath
from mcp_fhir.tools.results import SearchResult, respond

REFRESH_PER_MINUTE = 6  # per caller; a refresh always reaches the EHR, so it is rationed
AUDIT_PAGE_MAX = 200

RefreshType = Literal[PATIENT_TYPES]  # type: ignore[valid-type]


class _RefreshLimiter:
    """A sliding one-minute window per caller."""

    def __init__(self, per_minute: int = REFRESH_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self._calls: dict[str, deque[float]] = defaultdict(deque)

    def check(self, caller: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        window = self._calls[caller]
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= self.per_minute:
            raise UpstreamRateLimited(f"refresh is limited to {self.per_minute} calls a minute per caller")
        window.append(now)


class AuditLogResult(BaseModel):
    """Audit records matching the filters, as FHIR AuditEvents, with the policy's redactions applied."""

    count: int
    events: list[dict[str, Any]]
    redacted_elements: int = 0
    continuation: str | None = None
    decision_id: str | None = None


def register(server: MCPServer) -> None:
    limiter = _RefreshLimiter()

    @server.tool(
        annotations=ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        ),
        structured_output=True,
    )
    async def refresh(
        patient_id: PatientId,
        resource_type: RefreshType,
        ctx: Context,
        purpose: Purpose = None,
        break_glass_reason: BreakGlassReason = None,
    ) -> SearchResult:
        """Re-read a patient's resources of one type from the EHR, bypassing the cache (rate-limited)."""
        limiter.check(current_subject_id(ctx))
        return await search_tool(  # type: ignore[return-value]
            ctx,
            tool="refresh",
            rtype=resource_type,
            patient_id=patient_id,
            purpose=purpose,
            break_glass_reason=break_glass_reason,
            bypass_cache=True,
        )

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def search_audit_log(
        ctx: Context,
        purpose: Purpose = None,
        patient_id: Annotated[str | None, Field(default=None, pattern=FHIR_ID)] = None,
        agent_id: Annotated[
            str | None, Field(default=None, max_length=200, pattern=r"^[\w@.:/\-|]+$")
        ] = None,
        result: Literal["allowed", "denied", "error"] | None = None,
        since: date | None = None,
        until: date | None = None,
        limit: Annotated[int, Field(ge=1, le=AUDIT_PAGE_MAX)] = 50,
        continuation: Annotated[
            str | None, Field(default=None, max_length=512, pattern=r"^[A-Za-z0-9_\-\.=]+$")
        ] = None,
    ) -> AuditLogResult:
        """Search the sidecar's audit trail (read-only), under policy."""
        app = app_of(ctx)
        params = audit_params(
            patient_id=patient_id, agent_id=agent_id, result=result, since=since, until=until, limit=limit
        )
        async with CallPath(app).begin(
            tool="search_audit_log",
            resource_type="AuditEvent",
            operation="search",
            patient=None,
            params=params,
            purpose=purpose,
            break_glass_reason=None,
        ) as call:
            ob = call.decision.obligations
            cap = min(limit, ob.max_results) if ob.max_results is not None else limit
            records, cursor = await app.audit.query(
                app.audit_query(
                    patient=patient_id, subject_id=agent_id, result=result, since=since, until=until
                ),
                limit=cap,
                cursor=continuation,
            )
            events = [to_audit_event(r) for r in records]
            redacted = sum(redact(e, ob.redact) for e in events)
            out = AuditLogResult(
                count=len(events),
                events=events,
                redacted_elements=redacted,
                continuation=cursor,
                decision_id=call.decision.decision_id,
            )
            await call.commit(returned=len(events), filtered=0, cache=None)
        lines = [f"### {out.count} audit events"] + [
            f"- {e.get('recorded')} {e.get('subtype', [{}])[0].get('code', '')} outcome={e.get('outcome')} "
            f"{e.get('outcomeDesc', '')}"
            for e in events
        ]
        return respond(out, "\n".join(lines))  # type: ignore[return-value]
