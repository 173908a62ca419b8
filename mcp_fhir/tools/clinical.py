"""Patient-data tools, declared: read the patient, search each clinical resource family, and summarise.

Each is a `Tool` declaration; `CallPath.run` decides, fetches, enforces, audits and responds.
A new search tool is one `search_family(...)` entry plus its FHIR search parameters below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.catalog import SUMMARY_SECTIONS
from mcp_fhir.context import AppContext
from mcp_fhir.policy.engine import Obligations
from mcp_fhir.tools.callpath import Call
from mcp_fhir.tools.declare import Enforced, Fetched, Tool, ToolArgs
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
from mcp_fhir.tools.results import (
    SearchResult,
    SummaryResult,
    SummarySection,
    flag_resources,
    make_continuation,
    provenance,
    read_continuation,
    render_search,
    render_summary,
    sources_of,
    summarise,
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
    "Immunization": ("date", None, "vaccine-code"),
}
SUMMARY_SORT: Mapping[str, str] = {"Condition": "-recorded-date"}


# --- parameters ---------------------------------------------------------------------------------------------


class PatientArgs(ToolArgs):
    patient_id: PatientId
    purpose: Purpose = None
    break_glass_reason: BreakGlassReason = None


class SearchArgs(PatientArgs):
    category: Category = None
    code: Code = None
    date_from: DateFrom = None
    date_to: DateTo = None
    page_size: PageSize = None
    continuation: Continuation = None

    def narrowing(self) -> dict[str, Any]:
        return audit_params(
            category=self.category,
            code=self.code,
            date_from=self.date_from,
            date_to=self.date_to,
            page_size=self.page_size,
            continuation=bool(self.continuation) or None,
        )


def check_search(tool: str, args: SearchArgs, app: AppContext, _subject: Subject) -> None:
    """Step 2 beyond the types: a bounded, ordered range, and a continuation this server issued."""
    check_range(args.date_from, args.date_to, max_days=app.limits.max_range_days)
    if args.continuation:
        read_continuation(app.continuation_key, args.continuation, tool=tool, patient=args.patient_id)


# --- fetch ----------------------------------------------------------------------------------------------------


def upstream_query(
    rtype: str,
    backend_patient: str,
    ob: Obligations,
    *,
    category: str | None,
    code: str | None,
    date_from: date | None,
    date_to: date | None,
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


def page_size(app: AppContext, requested: int | None, ob: Obligations) -> int:
    page = min(requested or app.limits.default_page_size, app.limits.max_page_size)
    return max(1, min(page, ob.max_results)) if ob.max_results is not None else page


async def fetch_search(call: Call, args: SearchArgs, *, bypass_cache: bool = False) -> Fetched:
    app = call.app
    rtype = call.resource_type
    continuation = getattr(args, "continuation", None)
    next_url = (
        read_continuation(app.continuation_key, continuation, tool=call.tool.name, patient=call.patient)
        if continuation
        else None
    )
    query = upstream_query(
        rtype,
        call.backend_patient or "",
        call.obligations,
        category=getattr(args, "category", None),
        code=getattr(args, "code", None),
        date_from=getattr(args, "date_from", None),
        date_to=getattr(args, "date_to", None),
    )
    fetch = await app.backend(call.backend).search(
        rtype,
        query,
        patient=call.patient,
        page_size=page_size(app, getattr(args, "page_size", None), call.obligations),
        next_url=next_url,
        bypass_cache=bypass_cache,
    )
    return Fetched(fetch.resources, source=fetch)


async def fetch_patient(call: Call, _args: PatientArgs) -> Fetched:
    fetch = await call.app.backend(call.backend).read(
        "Patient", call.backend_patient or "", patient=call.patient
    )
    return Fetched(fetch.resources, source=fetch)


def build_search(call: Call, args: PatientArgs, fetched: Fetched, enforced: Enforced) -> SearchResult:
    app = call.app
    source = fetched.upstream
    return SearchResult(
        resource_type=call.resource_type,
        patient=args.patient_id,
        count=len(enforced.resources),
        resources=enforced.resources,
        withheld=enforced.withheld,
        continuation=make_continuation(
            app.continuation_key, tool=call.tool.name, patient=args.patient_id, next_url=source.next_url
        ),
        untrusted_text_flags=flag_resources(enforced.resources) if app.flag_injection else [],
        provenance=provenance(source, call.decision),
        sources=sources_of(enforced.resources, source),
    )


# --- declarations ---------------------------------------------------------------------------------------------


READ_PATIENT = Tool(
    name="read_patient",
    description="Read one patient's demographics (Patient resource), under policy.",
    args=PatientArgs,
    result=SearchResult,
    operation="read",
    resource_type="Patient",
    fetch=fetch_patient,
    build=build_search,
    render=partial(render_search, title="patient"),
)


def search_family(name: str, rtype: str, description: str) -> Tool:
    """A search tool over one FHIR resource family (its search parameters are in `SEARCH_PARAMS`)."""
    return Tool(
        name=name,
        description=description,
        args=SearchArgs,
        result=SearchResult,
        operation="search",
        resource_type=rtype,
        fetch=fetch_search,
        build=build_search,
        render=partial(render_search, title=name.replace("_", " ")),
        check=partial(check_search, name),
    )


SEARCH_TOOLS: tuple[Tool, ...] = (
    search_family(
        "search_observations",
        "Observation",
        "Search a patient's observations (labs, vitals) by category, code and date range, under policy.",
    ),
    search_family(
        "search_medication_statements",
        "MedicationStatement",
        "Search a patient's medication statements, under policy.",
    ),
    search_family(
        "search_medication_requests",
        "MedicationRequest",
        "Search a patient's medication orders, under policy.",
    ),
    search_family(
        "search_conditions", "Condition", "Search a patient's conditions and problems, under policy."
    ),
    search_family(
        "search_encounters", "Encounter", "Search a patient's encounters (visits, admissions), under policy."
    ),
    search_family("search_procedures", "Procedure", "Search a patient's procedures, under policy."),
    search_family(
        "search_allergies",
        "AllergyIntolerance",
        "Search a patient's allergies and intolerances, under policy.",
    ),
    search_family(
        "list_documents",
        "DocumentReference",
        "List a patient's clinical documents and notes (DocumentReference) by category, type and date, under policy.",
    ),
    search_family(
        "search_immunizations",
        "Immunization",
        "Search a patient's immunizations (vaccines given) by vaccine code and date range, under policy.",
    ),
)


# --- patient_summary: one decision per section, one audit record per call -----------------------------------


async def fetch_summary(call: Call, _args: PatientArgs) -> Fetched:
    app = call.app
    ehr = app.backend(call.backend)
    items = app.limits.summary_items_per_section

    async def section(rtype: str) -> tuple[str, Fetched]:
        ob = call.decisions[rtype].obligations
        if rtype == "Patient":
            fetch = await ehr.read("Patient", call.backend_patient or "", patient=call.patient)
        else:
            query = upstream_query(
                rtype, call.backend_patient or "", ob, category=None, code=None, date_from=None, date_to=None
            )
            query["_sort"] = SUMMARY_SORT.get(rtype, "-" + SEARCH_PARAMS[rtype][0])
            fetch = await ehr.search(
                rtype, query, patient=call.patient, page_size=min(items, ob.max_results or items)
            )
        return rtype, Fetched(fetch.resources, source=fetch)

    allowed = [rt for rt, d in call.decisions.items() if d.allow]
    return Fetched(parts=dict(await asyncio.gather(*(section(rt) for rt in allowed))))


def build_summary(call: Call, args: PatientArgs, _fetched: Fetched, enforced: Enforced) -> SummaryResult:
    sections: list[SummarySection] = []
    flagged: list[str] = []
    for rtype, decision in call.decisions.items():
        part = enforced.parts.get(rtype)
        if not decision.allow or part is None:
            sections.append(
                SummarySection(
                    resource_type=rtype,
                    allowed=False,
                    reasons=list(decision.reason_codes),
                    decision_id=decision.decision_id,
                )
            )
            continue
        sections.append(
            SummarySection(
                resource_type=rtype,
                allowed=True,
                count=len(part.resources),
                items=[summarise(r) for r in part.resources],
                decision_id=decision.decision_id,
            )
        )
        if call.app.flag_injection:
            flagged += flag_resources(part.resources)
    return SummaryResult(patient=args.patient_id, sections=sections, untrusted_text_flags=flagged)


PATIENT_SUMMARY = Tool(
    name="patient_summary",
    description="Summarise a patient: demographics, conditions, medications, recent observations, allergies.",
    args=PatientArgs,
    result=SummaryResult,
    operation="read",
    resource_type="Patient",
    sections=SUMMARY_SECTIONS,
    fetch=fetch_summary,
    build=build_summary,
    render=render_summary,
)

TOOLS: tuple[Tool, ...] = (READ_PATIENT, *SEARCH_TOOLS, PATIENT_SUMMARY)

__all__ = [
    "PATIENT_SUMMARY",
    "READ_PATIENT",
    "SEARCH_PARAMS",
    "SEARCH_TOOLS",
    "TOOLS",
    "PatientArgs",
    "SearchArgs",
    "search_family",
    "upstream_query",
]
