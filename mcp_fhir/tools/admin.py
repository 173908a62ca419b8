"""Operational tools, declared: `refresh` (bypass the cache, rate-limited per caller) and `search_audit_log`.

`search_audit_log` tells the policy which patient it filters on (`resource.patient`), and
enforces the `audit_patients` obligation its allowed decisions must carry: `null` lets events
about any patient through; a list restricts the query to those patients and filters the
results again, so no event about another patient leaves. An allow without `audit_patients`
is `opa_malformed` (a deny).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from datetime import date, datetime
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import Field

from mcp_fhir._exceptions import UpstreamRateLimited
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.export_fhir import to_audit_event
from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.catalog import PATIENT_TYPES
from mcp_fhir.context import AppContext
from mcp_fhir.policy.obligations import redact
from mcp_fhir.tools.callpath import Call
from mcp_fhir.tools.clinical import PatientArgs, build_search, fetch_search
from mcp_fhir.tools.declare import Enforced, Fetched, Tool, ToolArgs
from mcp_fhir.tools.params import FHIR_ID, Purpose, audit_params
from mcp_fhir.tools.results import AuditLogResult, SearchResult, Withheld, render_audit_log, render_search

REFRESH_PER_MINUTE = 6  # per caller; a refresh always reaches the EHR, so it is rationed
AUDIT_PAGE_MAX = 200
AUDIT_PATIENTS = "audit_patients"

RefreshType = Literal[PATIENT_TYPES]  # type: ignore[valid-type]


class RefreshLimiter:
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


# --- refresh ----------------------------------------------------------------------------------------------------


class RefreshArgs(PatientArgs):
    resource_type: RefreshType

    def narrowing(self) -> dict[str, Any]:
        return {"bypass_cache": True}  # the resource type is the decision's action.resource_type


def refresh_tool(limiter: RefreshLimiter) -> Tool:
    def check(_args: RefreshArgs, _app: AppContext, subject: Subject) -> None:
        limiter.check(subject.id)

    return Tool(
        name="refresh",
        description="Re-read a patient's resources of one type from the EHR, bypassing the cache (rate-limited).",
        args=RefreshArgs,
        result=SearchResult,
        operation="search",
        resource_type=lambda args: args.resource_type,
        fetch=partial(fetch_search, bypass_cache=True),
        build=build_search,
        render=partial(render_search, title="refresh"),
        check=check,
    )


# --- search_audit_log -------------------------------------------------------------------------------------------


class AuditLogArgs(ToolArgs):
    reads_patient_data = False  # `patient_id` names a patient in the audit trail, not in the EHR

    purpose: Purpose = None
    patient_id: Annotated[str | None, Field(default=None, pattern=FHIR_ID)] = None
    agent_id: Annotated[str | None, Field(default=None, max_length=200, pattern=r"^[\w@.:/\-|]+$")] = None
    result: Literal["allowed", "denied", "error"] | None = None
    since: date | None = None
    until: date | None = None
    limit: Annotated[int, Field(ge=1, le=AUDIT_PAGE_MAX)] = 50
    continuation: Annotated[
        str | None, Field(default=None, max_length=512, pattern=r"^[A-Za-z0-9_\-\.=]+$")
    ] = None

    def narrowing(self) -> dict[str, Any]:
        # patient_id is the decision input's resource.patient; the cursor does not narrow.
        return audit_params(
            agent_id=self.agent_id, result=self.result, since=self.since, until=self.until, limit=self.limit
        )


def _day(d: date | None) -> str | None:
    return datetime.combine(d, datetime.min.time()).isoformat() + "Z" if d else None


async def fetch_audit_log(call: Call, args: AuditLogArgs) -> Fetched:
    ob = call.obligations
    cap = min(args.limit, ob.max_results) if ob.max_results is not None else args.limit
    allowed = ob.audit_patients
    patient = args.patient_id
    if allowed is not None:
        if patient is not None and patient not in allowed:
            return Fetched()  # a patient the policy does not let this caller see: nothing to query
        if patient is None and len(allowed) == 1:
            patient = next(iter(allowed))  # restrict the query itself to the one permitted patient
    query = AuditQuery(
        patient=patient,
        subject_id=args.agent_id,
        result=args.result,
        since=_day(args.since),
        until=_day(args.until),
        kind="access",
    )
    records, cursor = await call.app.audit.query(query, limit=cap, cursor=args.continuation)
    return Fetched(records, cursor=cursor)


def enforce_audit_log(call: Call, fetched: Fetched) -> Enforced:
    """Step 7 for the audit log: only events about the permitted patients, then the policy's redactions."""
    ob = call.obligations
    allowed = ob.audit_patients
    kept = [r for r in fetched.resources if allowed is None or r.get("patient") in allowed]
    events = [to_audit_event(r) for r in kept]
    redacted = sum(redact(e, ob.redact) for e in events)
    return Enforced(
        events, Withheld(over_limit=len(fetched.resources) - len(kept), redacted_elements=redacted)
    )


def build_audit_log(call: Call, _args: AuditLogArgs, fetched: Fetched, enforced: Enforced) -> AuditLogResult:
    return AuditLogResult(
        count=len(enforced.resources),
        events=enforced.resources,
        redacted_elements=enforced.withheld.redacted_elements,
        continuation=fetched.cursor,
        decision_id=call.decision.decision_id,
    )


SEARCH_AUDIT_LOG = Tool(
    name="search_audit_log",
    description="Search the sidecar's audit trail (read-only), under policy.",
    args=AuditLogArgs,
    result=AuditLogResult,
    operation="search",
    resource_type="AuditEvent",
    fetch=fetch_audit_log,
    enforce=enforce_audit_log,
    build=build_audit_log,
    render=render_audit_log,
    requires=(AUDIT_PATIENTS,),
)


def tools() -> tuple[Tool, ...]:
    """The operational tools; each server gets its own refresh limiter."""
    return (refresh_tool(RefreshLimiter()), SEARCH_AUDIT_LOG)
