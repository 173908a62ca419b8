"""Patient-data tools: read the patient, search each clinical resource family, and summarise.

Every tool goes through `CallPath`: the policy decides, obligations are enforced on what the
EHR returned, and the audit record is durable before the result is returned.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import BaseModel

from mcp_fhir._exceptions import MCPFhirError, PolicyDenied
from mcp_fhir.catalog import SUMMARY_SECTIONS
from mcp_fhir.context import AppContext
from mcp_fhir.ehr.client import FetchResult
from mcp_fhir.policy.engine import Obligations
from mcp_fhir.policy.obligations import enforce
from mcp_fhir.tools.params import (
    BreakGlassReason,
    Category,
    Code,
    Continuation,
    DateFrom,
    DateTo,
    PageSize,
    PatientId,
    Purpose,
    audit_params,
    check_range,
)
from mcp_fhir.tools.pipeline import Call, CallPath, current_subject
from mcp_fhir.tools.results import (
    SearchResult,
    Withheld,
    flag_resources,
    make_continuation,
    provenance,
    read_continuation,
    render_search,
    respond,
    summarise,
)
from mcp_fhir.tools.untrusted import UNTRUSTED_NOTICE, fence

READ_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)

# FHIR R4 search parameter names for each family: (date parameter, category parameter, code parameter).
SEARCH_PARAMS: Mapping[str, tuple[str, str | None, str]] = {
    "Observation": ("date", "category", "code"),
    "Condition": ("recorded-date", "category", "code"),
    "MedicationStatement": ("effective", "category", "code"),
    "MedicationRequest": ("authoredon", "category", "code"),
    "Encounter": ("date", None, "type"),
    "Procedure": ("date", "category", "code"),
    "AllergyIntolerance": ("date", "category", "code"),
    "DocumentReference": ("date", "category", "type"),
}


def app_of(ctx: Context) -> AppContext:
    return cast(AppContext, ctx.request_context.lifespan_context)


def current_subject_id(ctx: Context) -> str:
    return current_subject(app_of(ctx)).id


# A reference that names a Patient: `Patient/x`, `https://ehr/fhir/Patient/x[/_history/n]`, `Patient?identifier=...`.
_PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient(?:[/?]|$)")


def _references(node: Any) -> Iterator[str]:
    """Every `reference` string anywhere in `node`, contained resources included."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def references_patient(resource: Mapping[str, Any], backend_patient: str) -> bool:
    """Defence in depth: a resource must point at the patient the call was authorised for, and at no other.

    Its `subject` (or `patient`) must reference that patient, every other Patient reference in it
    (contained resources included) must be that patient too, and it may not contain a Patient resource.
    """
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == backend_patient
    want = f"Patient/{backend_patient}"

    def own(ref: str) -> bool:
        return ref == want or ref.endswith("/" + want)

    primary = next(
        (
            ref["reference"]
            for ref in (resource.get("subject"), resource.get("patient"))
            if isinstance(ref, Mapping) and isinstance(ref.get("reference"), str)
        ),
        None,
    )
    if primary is None or not own(primary):
        return False
    contained = resource.get("contained") or []
    if any(isinstance(c, Mapping) and c.get("resourceType") == "Patient" for c in contained):
        return False
    return all(own(ref) for ref in _references(resource) if _PATIENT_REFERENCE.search(ref))


def upstream_query(
    rtype: str,
    backend_patient: str,
    ob: Obligations,
    *,
    category: str | None,
    code: str | None,
    date_from: Any,
    date_to: Any,
) -> dict[str, str | list[str]]:
    """The EHR query: the caller's filters, narrowed up front by the obligations (enforcement still follows)."""
    date_param, category_param, code_param = SEARCH_PARAMS[rtype]
    query: dict[str, str | list[str]] = {"patient": backend_patient}
    dates = []
    lookback_from = None
    if ob.max_lookback_days is not None:
        lookback_from = (datetime.now(UTC) - timedelta(days=ob.max_lookback_days)).date()
    start = (
        max(d for d in (date_from, lookback_from) if d is not None) if (date_from or lookback_from) else None
    )
    if start:
        dates.append(f"ge{start.isoformat()}")
    if date_to:
        dates.append(f"le{date_to.isoformat()}")
    if dates:
        query[date_param] = dates if len(dates) > 1 else dates[0]
    allowed = ob.allowed_categories.get(rtype)
    if category_param and category:
        query[category_param] = category
    elif category_param and allowed:
        query[category_param] = ",".join(sorted(allowed))
    if code:
        query[code_param] = code
    return query


def enforce_page(call: Call, fetch: FetchResult) -> tuple[list[dict[str, Any]], Withheld]:
    """Step 7: keep only the authorised patient's resources, then apply every obligation."""
    own = [r for r in fetch.resources if references_patient(r, call.backend_patient or "")]
    enforced = enforce(own, call.decision.obligations)
    withheld = Withheld(
        security_label=enforced.withheld_label,
        category=enforced.withheld_category,
        lookback=enforced.withheld_lookback,
        over_limit=enforced.truncated + (len(fetch.resources) - len(own)),
        redacted_elements=enforced.redacted_elements,
    )
    return enforced.resources, withheld


async def search_tool(
    ctx: Context,
    *,
    tool: str,
    rtype: str,
    patient_id: str,
    purpose: str | None,
    break_glass_reason: str | None,
    category: str | None = None,
    code: str | None = None,
    date_from: Any = None,
    date_to: Any = None,
    page_size: int | None = None,
    continuation: str | None = None,
    bypass_cache: bool = False,
) -> CallToolResult:
    """Search one resource family for one patient, under policy."""
    app = app_of(ctx)
    check_range(date_from, date_to, max_days=app.limits.max_range_days)
    next_url = (
        read_continuation(app.continuation_key, continuation, tool=tool, patient=patient_id)
        if continuation
        else None
    )
    params = audit_params(
        category=category,
        code=code,
        date_from=date_from,
        date_to=date_to,
        page_size=page_size,
        continuation=bool(continuation) or None,
        bypass_cache=bypass_cache or None,
    )
    async with CallPath(app).begin(
        tool=tool,
        resource_type=rtype,
        operation="search",
        patient=patient_id,
        params=params,
        purpose=purpose,
        break_glass_reason=break_glass_reason,
    ) as call:
        ob = call.decision.obligations
        page = min(page_size or app.limits.default_page_size, app.limits.max_page_size)
        if ob.max_results is not None:
            page = max(1, min(page, ob.max_results))
        query = upstream_query(
            rtype,
            call.backend_patient or "",
            ob,
            category=category,
            code=code,
            date_from=date_from,
            date_to=date_to,
        )
        fetch = await app.backend(call.backend).search(
            rtype, query, patient=call.patient, page_size=page, next_url=next_url, bypass_cache=bypass_cache
        )
        kept, withheld = enforce_page(call, fetch)
        result = SearchResult(
            resource_type=rtype,
            patient=patient_id,
            count=len(kept),
            resources=kept,
            withheld=withheld,
            continuation=make_continuation(
                app.continuation_key, tool=tool, patient=patient_id, next_url=fetch.next_url
            ),
            untrusted_text_flags=flag_resources(kept) if app.flag_injection else [],
            provenance=provenance(fetch, call.decision),
        )
        await call.commit(returned=len(kept), filtered=withheld.resources, cache=fetch.cache)
    return respond(result, render_search(result, title=tool.replace("_", " ")))


class SummarySection(BaseModel):
    resource_type: str
    allowed: bool
    count: int = 0
    items: list[str] = []
    reasons: list[str] = []
    decision_id: str | None = None


class SummaryResult(BaseModel):
    """A compact cross-section of one patient's record; each section was decided on its own."""

    patient: str
    sections: list[SummarySection]
    untrusted_text_flags: list[str] = []


def register(server: MCPServer) -> None:
    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def read_patient(
        patient_id: PatientId,
        ctx: Context,
        purpose: Purpose = None,
        break_glass_reason: BreakGlassReason = None,
    ) -> SearchResult:
        """Read one patient's demographics (Patient resource), under policy."""
        app = app_of(ctx)
        params = audit_params()
        async with CallPath(app).begin(
            tool="read_patient",
            resource_type="Patient",
            operation="read",
            patient=patient_id,
            params=params,
            purpose=purpose,
            break_glass_reason=break_glass_reason,
        ) as call:
            fetch = await app.backend(call.backend).read(
                "Patient", call.backend_patient or "", patient=call.patient
            )
            kept, withheld = enforce_page(call, fetch)
            result = SearchResult(
                resource_type="Patient",
                patient=patient_id,
                count=len(kept),
                resources=kept,
                withheld=withheld,
                provenance=provenance(fetch, call.decision),
            )
            await call.commit(returned=len(kept), filtered=withheld.resources, cache=fetch.cache)
        return respond(result, render_search(result, title="patient"))  # type: ignore[return-value]

    def family(tool: str, rtype: str, doc: str) -> None:
        async def run(
            patient_id: PatientId,
            ctx: Context,
            purpose: Purpose = None,
            category: Category = None,
            code: Code = None,
            date_from: DateFrom = None,
            date_to: DateTo = None,
            page_size: PageSize = None,
            continuation: Continuation = None,
            break_glass_reason: BreakGlassReason = None,
        ) -> SearchResult:
            return await search_tool(  # type: ignore[return-value]
                ctx,
                tool=tool,
                rtype=rtype,
                patient_id=patient_id,
                purpose=purpose,
                category=category,
                code=code,
                date_from=date_from,
                date_to=date_to,
                page_size=page_size,
                continuation=continuation,
                break_glass_reason=break_glass_reason,
            )

        run.__name__ = tool
        run.__doc__ = doc
        server.tool(name=tool, description=doc, annotations=READ_ONLY, structured_output=True)(run)

    family(
        "search_observations",
        "Observation",
        "Search a patient's observations (labs, vitals) by category, code and date range, under policy.",
    )
    family(
        "search_medication_statements",
        "MedicationStatement",
        "Search a patient's medication statements, under policy.",
    )
    family(
        "search_medication_requests",
        "MedicationRequest",
        "Search a patient's medication orders, under policy.",
    )
    family("search_conditions", "Condition", "Search a patient's conditions and problems, under policy.")
    family(
        "search_encounters", "Encounter", "Search a patient's encounters (visits, admissions), under policy."
    )
    family("search_procedures", "Procedure", "Search a patient's procedures, under policy.")
    family(
        "search_allergies",
        "AllergyIntolerance",
        "Search a patient's allergies and intolerances, under policy.",
    )
    family(
        "list_documents",
        "DocumentReference",
        "List a patient's clinical documents and notes (DocumentReference) by category, type and date, under policy.",
    )

    @server.tool(annotations=READ_ONLY, structured_output=True)
    async def patient_summary(
        patient_id: PatientId,
        ctx: Context,
        purpose: Purpose = None,
        break_glass_reason: BreakGlassReason = None,
    ) -> SummaryResult:
        """Summarise a patient: demographics, conditions, medications, recent observations, allergies."""
        return await summary(ctx, patient_id, purpose, break_glass_reason)  # type: ignore[return-value]


async def _section(
    app: AppContext, rtype: str, patient_id: str, purpose: str | None, break_glass_reason: str | None
) -> tuple[SummarySection, list[dict[str, Any]]]:
    try:
        async with CallPath(app).begin(
            tool="patient_summary",
            resource_type=rtype,
            operation="read",
            patient=patient_id,
            params={"section": rtype},
            purpose=purpose,
            break_glass_reason=break_glass_reason,
        ) as call:
            ehr = app.backend(call.backend)
            ob = call.decision.obligations
            limit = min(
                app.limits.summary_items_per_section, ob.max_results or app.limits.summary_items_per_section
            )
            if rtype == "Patient":
                fetch = await ehr.read("Patient", call.backend_patient or "", patient=call.patient)
            else:
                query = upstream_query(
                    rtype,
                    call.backend_patient or "",
                    ob,
                    category=None,
                    code=None,
                    date_from=None,
                    date_to=None,
                )
                query["_sort"] = "-" + SEARCH_PARAMS[rtype][0] if rtype != "Condition" else "-recorded-date"
                fetch = await ehr.search(rtype, query, patient=call.patient, page_size=limit)
            kept, withheld = enforce_page(call, fetch)
            await call.commit(returned=len(kept), filtered=withheld.resources, cache=fetch.cache)
            return SummarySection(
                resource_type=rtype,
                allowed=True,
                count=len(kept),
                items=[summarise(r) for r in kept],
                decision_id=call.decision.decision_id,
            ), kept
    except PolicyDenied as exc:
        return SummarySection(
            resource_type=rtype, allowed=False, reasons=exc.reasons, decision_id=exc.decision_id
        ), []


async def summary(
    ctx: Context, patient_id: str, purpose: str | None, break_glass_reason: str | None
) -> CallToolResult:
    app = app_of(ctx)
    results = await asyncio.gather(
        *(_section(app, rtype, patient_id, purpose, break_glass_reason) for rtype in SUMMARY_SECTIONS),
        return_exceptions=True,
    )
    sections: list[SummarySection] = []
    flagged: list[str] = []
    for outcome in results:
        if isinstance(outcome, MCPFhirError):
            raise outcome
        if isinstance(outcome, BaseException):
            raise outcome
        section, kept = outcome
        sections.append(section)
        if app.flag_injection:
            flagged += flag_resources(kept)
    if not any(s.allowed for s in sections):
        first = sections[0]
        err = PolicyDenied([{"code": c} for c in first.reasons], decision_id=first.decision_id)
        err.audited = True  # every section's denial was audited on its own
        raise err
    result = SummaryResult(patient=patient_id, sections=sections, untrusted_text_flags=flagged)
    body: list[str] = []
    for s in sections:
        if not s.allowed:
            body.append(f"**{s.resource_type}**: withheld by policy ({', '.join(s.reasons)})")
            continue
        body.append(f"**{s.resource_type}** ({s.count})")
        body += [f"- {item}" for item in s.items]
    lines = [f"### Summary of patient {patient_id}", fence(body)]
    if flagged:
        lines.append(UNTRUSTED_NOTICE)
    return respond(result, "\n".join(lines))
