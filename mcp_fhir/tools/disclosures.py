"""`audit_disclosures`, declared: a patient's accounting of disclosures as an MCP tool (issue #21 §2).

The same report as `mcp-fhir audit disclosures` (`mcp_fhir/audit/disclosures.py`), from the running
trail once it verifies (`AuditTrail.disclosures`: a trail that does not verify gives
`audit_unavailable`, never a report). It sits behind the same policy gates as `search_audit_log`:
the resource type is AuditEvent, the operation search, and the patient the report is about is the
decision's `resource.patient` (so a role without `patient_filter` is denied). When the allow carries
`audit_patients` (a list), the patient must be in it.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from mcp_fhir.tools.callpath import Call
from mcp_fhir.tools.declare import Enforced, Fetched, Tool, ToolArgs
from mcp_fhir.tools.params import FHIR_ID, Purpose, audit_params


class DisclosuresArgs(ToolArgs):
    reads_patient_data = False  # the report is read from the local audit trail, not the EHR

    patient_id: Annotated[str, Field(pattern=FHIR_ID, description="The patient the accounting is for.")]
    purpose: Purpose = None
    since: date | None = None
    until: date | None = None

    def narrowing(self) -> dict[str, Any]:
        return audit_params(since=self.since, until=self.until)


class DisclosuresResult(BaseModel):
    """The accounting: who accessed the record, when, what, why, break-glass and denied attempts."""

    patient: str
    report: dict[str, Any]
    decision_id: str | None = None


def _day(d: date | None) -> str | None:
    return datetime.combine(d, datetime.min.time()).isoformat() + "Z" if d else None


async def fetch_disclosures(call: Call, args: DisclosuresArgs) -> Fetched:
    allowed = call.obligations.audit_patients
    if allowed is not None and args.patient_id not in allowed:
        return Fetched(audit_extra={"withheld_patient": True})  # not this caller's to see
    report = await call.app.audit.disclosures(args.patient_id, since=_day(args.since), until=_day(args.until))
    return Fetched([report.to_dict()], audit_extra={"report_accesses": len(report.accesses)})


def keep_report(_call: Call, fetched: Fetched) -> Enforced:
    return Enforced(fetched.resources)


def build_disclosures(
    call: Call, args: DisclosuresArgs, fetched: Fetched, enforced: Enforced
) -> DisclosuresResult:
    return DisclosuresResult(
        patient=args.patient_id,
        report=enforced.resources[0] if enforced.resources else {},
        decision_id=call.decision.decision_id,
    )


def render_disclosures(result: DisclosuresResult) -> str:
    if not result.report:
        return f"### No accounting of disclosures for {result.patient} under this policy"
    summary = result.report.get("summary", {})
    return (
        f"### Accounting of disclosures for {result.patient}\n"
        f"{summary.get('accesses', 0)} accesses, {summary.get('denied', 0)} denied attempts, "
        f"{summary.get('errors', 0)} failed calls (trail verified). The full report is in the structured result."
    )


AUDIT_DISCLOSURES = Tool(
    name="audit_disclosures",
    description="A patient's accounting of disclosures from the verified audit trail (for auditors), under policy.",
    args=DisclosuresArgs,
    result=DisclosuresResult,
    operation="search",
    resource_type="AuditEvent",
    fetch=fetch_disclosures,
    enforce=keep_report,
    build=build_disclosures,
    render=render_disclosures,
)

TOOLS: tuple[Tool, ...] = (AUDIT_DISCLOSURES,)
