"""The call path of every tool call, in order, in one place: `CallPath.run(tool, arguments)`.

    1 authenticate → 2 validate → 3 canonicalise → 4 decide → 5 deny? → 6 fetch → 7 enforce
    → 8 audit → 9 respond

A tool is a declaration (`declare.Tool`); it brings its parameters, how to fetch, how to
enforce (by default: the patient binding, then the decision's obligations) and how to render.
Everything else is here, once:

* a refusal before the decision (no identity, bad arguments, an unknown patient, a tool the
  EHR did not grant scopes for) is audited as an `error` record, then raised;
* a deny is audited as a `denied` record, then raised as `PolicyDenied` with its reason codes
  and decision id;
* an allow is fetched, enforced and built, and its one `allowed` record is durable before the
  result is returned; a failure after the decision is audited as an `error` record (best effort:
  the error leaves either way), and an unexpected exception leaves as `internal_error`.

So every error that leaves `run` has been audited (or is `audit_unavailable`), and nothing
outside the call path audits tool calls. A multi-part tool (`patient_summary`) is decided once
per section, and still writes one record per call: each section's result, reasons, decision id
and counts are in its `extra.sections`; its alerts are the union of the sections' alerts.

Every record of one HTTP request carries that request's id (`logs.current_ids`), the same id
as its log lines; on stdio each call gets a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.types import CallToolResult, InputRequiredResult
from pydantic import ValidationError

from mcp_fhir import metrics, tracing
from mcp_fhir._exceptions import (
    AuditUnavailable,
    AuthenticationError,
    ConfirmationRequired,
    InvalidArgument,
    MCPFhirError,
    PolicyDenied,
    ToolUnavailable,
)
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.catalog import LOCAL_TYPES
from mcp_fhir.logs import current_ids
from mcp_fhir.policy.engine import Decision, Obligations
from mcp_fhir.policy.input import DecisionInput
from mcp_fhir.policy.obligations import enforce
from mcp_fhir.tools.confirm import InputNeeded, confirm
from mcp_fhir.tools.declare import Enforced, Fetched, Tool, ToolArgs
from mcp_fhir.tools.results import Withheld, respond

if TYPE_CHECKING:
    from mcp_fhir.context import AppContext

log = logging.getLogger("mcp_fhir.call")

UNKNOWN_TOOL = "(unknown)"
# An argument is named in an error only when its name is a plain identifier (it is caller data).
_NAMEABLE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def current_subject(app: AppContext) -> Subject:
    """Step 1: the authenticated caller: the bearer/API-key subject on HTTP, the configured identity on stdio."""
    access = get_access_token()
    if access is not None:
        return app.subject_from_access_token(access)
    if app.local_subject is not None:
        return app.local_subject
    raise AuthenticationError("no authenticated caller")


def request_ids() -> tuple[str, str | None]:
    """This request's id (the HTTP request's, as in its log lines; a fresh one on stdio) and trace id."""
    request_id, trace_id = current_ids()
    return request_id or uuid.uuid4().hex, trace_id


def client_info(ctx: Any) -> dict[str, str]:
    """What the client declared of itself at `initialize` (name, version; `model` only if it named one)."""
    try:
        info = ctx.session.client_params.client_info
    except Exception:  # no session (stdio resource, tests): nothing declared
        return {}
    out = {
        key: value
        for key, value in (
            ("name", getattr(info, "name", None)),
            ("version", getattr(info, "version", None)),
            (
                "model",
                getattr(info, "model", None) or (getattr(info, "model_extra", None) or {}).get("model"),
            ),
        )
        if isinstance(value, str) and value
    }
    return {k: v[:200] for k, v in out.items()}


def _headers(ctx: Any) -> Mapping[str, str] | None:
    """The HTTP request's headers (for W3C trace context), or None on stdio and without a context."""
    try:
        headers = ctx.headers
    except Exception:
        return None
    return headers if isinstance(headers, Mapping) else None


def nameable(argument: str) -> str:
    ok = 0 < len(argument) <= 64 and set(argument) <= _NAMEABLE and not argument[0].isdigit()
    return argument if ok else "arguments"


def validate(tool: Tool, arguments: Mapping[str, Any]) -> ToolArgs:
    """Step 2: typed parameters. An undeclared argument is refused by name, never silently dropped."""
    unknown = sorted(set(arguments) - set(tool.args.model_fields))
    if unknown:
        raise InvalidArgument(nameable(unknown[0]), "is not an argument of this tool")
    try:
        return tool.args.model_validate(dict(arguments))
    except ValidationError as err:
        raise invalid_from_validation(err) from None


def invalid_from_validation(err: ValidationError) -> InvalidArgument:
    """Name the argument and the rule, never the rejected value (it is the caller's data)."""
    first = err.errors()[0]
    argument = ".".join(str(p) for p in first["loc"]) or "arguments"
    rule = first["msg"].removeprefix("Value error, ")
    return InvalidArgument(nameable(argument) if "." not in argument else argument, rule)


@dataclass(repr=False)
class Call:
    """One call past its decision: who, about whom, what was decided. Its repr holds no PHI."""

    app: AppContext
    tool: Tool
    subject: Subject
    request_id: str
    trace_id: str | None
    patient: str | None
    backend_patient: str | None
    backend: str
    params: dict[str, Any]
    purpose: str | None
    break_glass_reason: str | None
    inputs: dict[str, DecisionInput]
    decisions: dict[str, Decision] = field(default_factory=dict)
    # What the agent declared of itself in MCP clientInfo (name, version, and a model if it named one).
    client_info: dict[str, str] = field(default_factory=dict)
    # The outcome of a person's confirmation, when the decision asked for one (for the audit record).
    confirmation: dict[str, Any] | None = None

    def __repr__(self) -> str:
        allowed = [rt for rt, d in self.decisions.items() if d.allow]
        return f"Call(tool={self.tool.name!r}, request_id={self.request_id!r}, allowed={allowed!r})"

    __str__ = __repr__

    @property
    def resource_type(self) -> str:
        return next(iter(self.inputs))

    @property
    def decision(self) -> Decision:
        """The decision of a one-part call (for a multi-part call: its first allowed part)."""
        return next((d for d in self.decisions.values() if d.allow), self.decisions[self.resource_type])

    @property
    def obligations(self) -> Obligations:
        return self.decision.obligations

    @property
    def allowed(self) -> bool:
        return any(d.allow for d in self.decisions.values())

    def record(
        self,
        result: str,
        *,
        error_code: str | None = None,
        fetched: Fetched | None = None,
        enforced: Enforced | None = None,
    ) -> AuditRecord:
        """The one audit record of this call."""
        decisions = list(self.decisions.values())
        d = self.decision
        extra: dict[str, Any] = dict(fetched.audit_extra) if fetched is not None else {}
        if d.cache is not None:  # the decision cache is on: "hit" names a reused decision id
            extra["decision_cache"] = d.cache
        if self.confirmation is not None:
            extra["confirmation"] = dict(self.confirmation)
        if self.tool.sections:
            extra["sections"] = [
                _section_record(
                    rt,
                    dec,
                    enforced.parts.get(rt) if enforced else None,
                    fetched.parts.get(rt) if fetched else None,
                )
                for rt, dec in self.decisions.items()
            ]
        counts: dict[str, Any] = {}
        if enforced is not None:
            counts = {
                "returned_count": _returned(enforced),
                "filtered_count": _filtered(enforced),
                "cache": fetched.cache if fetched is not None else None,
            }
        return AuditRecord(
            ts=utc_now_ms(),
            request_id=self.request_id,
            trace_id=self.trace_id,
            kind="access",
            result=result,
            subject_id=self.subject.id,
            on_behalf_of=self.subject.on_behalf_of,
            authn=self.subject.authn,
            tool=self.tool.name,
            resource_type=self.resource_type,
            operation=self.tool.operation,
            patient=self.patient,
            backend_patient=self.backend_patient,
            backend=self.backend,
            scopes=self.subject.scopes,
            purpose=self.purpose,
            break_glass_reason=self.break_glass_reason,
            reason_codes=tuple(sorted({c for dec in decisions for c in dec.reason_codes})),
            error_code=error_code,
            sensitivity=next((dec.sensitivity for dec in decisions if dec.sensitivity), None),
            alerts=tuple(dict.fromkeys(a for dec in decisions for a in dec.alerts)),
            params=self.params,
            decision_id=d.decision_id,
            policy_revision=d.revision,
            decision_input=self.inputs[self.resource_type].to_opa(),
            extra=extra,
            **counts,
        )


def _section_record(
    rtype: str, decision: Decision, enforced: Enforced | None, fetched: Fetched | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resource_type": rtype,
        "result": "allowed" if decision.allow else "denied",
        "reason_codes": list(decision.reason_codes),
        "decision_id": decision.decision_id,
    }
    if decision.cache is not None:
        out["decision_cache"] = decision.cache
    if enforced is not None:
        out["returned_count"] = len(enforced.resources)
        out["filtered_count"] = enforced.withheld.resources
    if fetched is not None:
        out["cache"] = fetched.cache
    return out


def _all(enforced: Enforced) -> Iterator[Enforced]:
    yield from enforced.parts.values() if enforced.parts else (enforced,)


def _returned(enforced: Enforced) -> int:
    return sum(len(e.resources) for e in _all(enforced))


def _filtered(enforced: Enforced) -> int:
    return sum(e.withheld.resources for e in _all(enforced))


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


def enforce_resources(
    resources: list[dict[str, Any]], backend_patient: str, obligations: Obligations
) -> Enforced:
    """Step 7 for FHIR resources: keep only the authorised patient's, then apply every obligation."""
    own = [r for r in resources if references_patient(r, backend_patient)]
    done = enforce(own, obligations)
    withheld = Withheld(
        security_label=done.withheld_label,
        category=done.withheld_category,
        lookback=done.withheld_lookback,
        over_limit=done.truncated + (len(resources) - len(own)),
        redacted_elements=done.redacted_elements,
    )
    return Enforced(done.resources, withheld)


def enforce_fetched(call: Call, fetched: Fetched) -> Enforced:
    """The default step 7: per part for a multi-part call, each under its own decision's obligations."""
    if call.tool.sections:
        return Enforced(
            resources=[],
            parts={
                rt: enforce_resources(
                    part.resources, call.backend_patient or "", call.decisions[rt].obligations
                )
                for rt, part in fetched.parts.items()
            },
        )
    return enforce_resources(fetched.resources, call.backend_patient or "", call.obligations)


async def visible_tools(app: AppContext, subject: Subject) -> frozenset[str]:
    """The tools `subject` may see: the policy's answer, enabled here, with the scopes the EHR granted."""
    visible = await app.decider.visible_tools(subject, backend=app.default_backend)
    return (visible & app.enabled_tools) - frozenset(app.unavailable_tools)


class CallPath:
    """Runs steps 1 to 9 of every tool call, in order, and audits whatever happens."""

    def __init__(self, app: AppContext) -> None:
        self.app = app

    def __repr__(self) -> str:
        return "CallPath()"

    async def run(
        self, tool: Tool, arguments: Mapping[str, Any], *, ctx: Any = None
    ) -> CallToolResult | InputRequiredResult:
        """Steps 1 to 9 for one call. `ctx` is the SDK's request context: it reaches the person
        (elicitation) when the decision asks for a confirmation, and names the client.

        One trace per call (`tracing.py`: a no-op unless tracing is configured), a child of the
        caller's W3C `traceparent` when the HTTP request carried one, with a span per step
        (authenticate, decide, fetch, enforce, audit) holding only allow-listed, PHI-free attributes.
        """
        request_id, trace_id = request_ids()
        with tracing.tool_call(tool.name, headers=_headers(ctx), request_id=request_id) as root:
            result = await self._run(tool, arguments, ctx, request_id, trace_id)
            tracing.annotate(
                root,
                **{
                    "audit.result": "input_required" if isinstance(result, InputRequiredResult) else "allowed"
                },
            )
            return result

    async def _run(
        self, tool: Tool, arguments: Mapping[str, Any], ctx: Any, request_id: str, trace_id: str | None
    ) -> CallToolResult | InputRequiredResult:
        app = self.app
        subject: Subject | None = None
        args: ToolArgs | None = None
        try:
            with tracing.span("authenticate") as auth_span:
                subject = current_subject(app)  # 1 authenticate
                tracing.annotate(auth_span, **{"auth.method": subject.authn, "auth.result": "ok"})
            args = validate(tool, arguments)  # 2 validate
            if tool.check is not None:
                tool.check(args, app, subject)
            if tool.name in app.unavailable_tools:
                # The EHR did not grant the scopes this tool needs: say so, rather than pass on its 403.
                raise ToolUnavailable(
                    f"the EHR did not grant the scopes {tool.name} needs",
                    missing_scopes=list(app.unavailable_tools[tool.name]),
                )
            rtypes = tool.resource_types(args)
            backend = app.default_backend
            patient = args.patient
            # 3 canonicalise. An unmapped id raises UnknownPatient; the ID map counts and logs it.
            local = not args.reads_patient_data or set(rtypes) <= LOCAL_TYPES
            backend_patient = await app.idmap.backend_id(patient, backend) if patient and not local else None
        except Exception as exc:
            refused = exc if isinstance(exc, MCPFhirError) else MCPFhirError("internal error")
            if refused is not exc:
                log.error("tool %s failed before its decision: %s", tool.name, type(exc).__name__)
            await self.refuse(
                tool.name,
                refused,
                subject=subject,
                request_id=request_id,
                trace_id=trace_id,
                patient=args.patient if args is not None else None,
                params=args.narrowing() if args is not None else {},
            )
            if refused is exc:
                raise
            raise refused from exc
        consent, activity = await self._context(subject, patient, backend_patient, local=local)
        params = args.narrowing()  # once per call: the audit record's and every section's decision input
        call = Call(
            app=app,
            tool=tool,
            subject=subject,
            request_id=request_id,
            trace_id=trace_id,
            patient=patient,
            backend_patient=backend_patient,
            backend=backend,
            params=params,
            purpose=args.purpose_of_use,
            break_glass_reason=args.break_glass,
            inputs={
                rt: DecisionInput(
                    subject=subject,
                    tool=tool.name,
                    operation=tool.operation,
                    resource_type=rt,
                    patient=patient,
                    params=params | ({"section": rt} if tool.sections else {}),
                    purpose=args.purpose_of_use,
                    break_glass_reason=args.break_glass,
                    backend=backend,
                    request_id=request_id,
                    consent=consent,
                    activity=activity,
                )
                for rt in rtypes
            },
            client_info=client_info(ctx),
        )
        # 4 decide (a multi-part tool: every section at once)
        with tracing.span("decide", **{"fhir.operation": tool.operation}) as decide_span:
            answers = await asyncio.gather(
                *(app.decider.decide(inp, requires=tool.requires) for inp in call.inputs.values())
            )
            call.decisions = dict(zip(call.inputs, answers, strict=True))
            tracing.annotate(
                decide_span,
                **{
                    "policy.allow": call.allowed,
                    "policy.reason_codes": sorted({c for d in answers for c in d.reason_codes}),
                    "policy.decision_id": call.decision.decision_id or "",
                    "policy.revision": call.decision.revision or "",
                },
            )
        if not call.allowed:  # 5 deny: audited, then raised
            with tracing.span("audit", **{"audit.result": "denied"}):
                await self._write(call.record("denied"))
            await self._denied(subject)
            metrics.TOOL_CALLS.labels(tool.name, "denied").inc()
            first = call.decisions[call.resource_type]
            raise PolicyDenied(first.reasons, decision_id=first.decision_id)
        try:
            if call.obligations.confirm is not None:  # 5b a person confirms, or nothing is written
                try:
                    answer = await confirm(
                        ctx, dict(call.obligations.confirm), tool=tool.name, patient=patient
                    )
                except InputNeeded as needed:  # the question goes back to the client; nothing written
                    call.confirmation = needed.confirmation.to_dict()
                    await self._write(call.record("allowed"))
                    metrics.TOOL_CALLS.labels(tool.name, "input_required").inc()
                    return needed.result
                call.confirmation = answer.to_dict()
            fetch_attrs = {"fhir.backend": call.backend, "fhir.operation": tool.operation}
            with tracing.span(
                "fetch", **fetch_attrs, **{"fhir.resource_type": call.resource_type}
            ) as fetch_span:
                fetched = await tool.fetch(call, args)  # 6 fetch
                tracing.annotate(fetch_span, **{"cache.outcome": fetched.cache or "none"})
            with tracing.span("enforce") as enforce_span:
                enforced = (tool.enforce or enforce_fetched)(call, fetched)  # 7 enforce
                tracing.annotate(
                    enforce_span,
                    **{"fhir.result_count": _returned(enforced), "fhir.withheld_count": _filtered(enforced)},
                )
            result = tool.build(call, args, fetched, enforced)
            markdown = tool.render(result)
            # 8 audit: durable before anything leaves
            with tracing.span("audit", **{"audit.result": "allowed"}):
                await self._write(call.record("allowed", fetched=fetched, enforced=enforced))
        except MCPFhirError as exc:
            if isinstance(exc, ConfirmationRequired):
                call.confirmation = exc.details.get("confirmation")
            await self._failed(call, exc)
            raise
        except Exception as exc:
            # A bug after the decision: audited with the decision's details, and it leaves as internal_error.
            log.error("tool %s failed after its decision: %s", tool.name, type(exc).__name__)
            internal = MCPFhirError("internal error")
            await self._failed(call, internal)
            raise internal from exc
        metrics.TOOL_CALLS.labels(tool.name, "allowed").inc()
        return respond(result, markdown)  # 9 respond

    async def _context(
        self, subject: Subject, patient: str | None, backend_patient: str | None, *, local: bool
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The decision's optional context: the patient's consent and the subject's activity.

        Each is None when its feature is off (the decision input is then unchanged). Consent is
        read for a call that reads a patient's EHR data; a reader never raises (an unreadable
        consent is `status: unavailable`, which the policy denies). Activity counts this call
        before its decision; counters that fail give `status: unavailable`, for the policy to judge.
        """
        app = self.app
        consent = None
        if app.consent is not None and patient is not None and not local:
            consent = await app.consent.context(backend_patient if app.consent_by_backend_id else patient)
        activity: dict[str, Any] | None = None
        if app.activity is not None:
            try:
                activity = dict(await app.activity.observe(subject.id, patient))
            except Exception as exc:
                log.error("activity counters failed: %s", type(exc).__name__)
                activity = {"status": "unavailable"}
        return consent, activity

    async def _denied(self, subject: Subject) -> None:
        """Count a denial for the subject's later decisions (best effort: the deny stands either way)."""
        if self.app.activity is None:
            return
        try:
            await self.app.activity.denied(subject.id)
        except Exception as exc:
            log.error("activity counters failed: %s", type(exc).__name__)

    async def refuse(
        self,
        tool: str,
        exc: MCPFhirError,
        *,
        subject: Subject | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        patient: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Audit a call refused before any decision (no identity, bad arguments, unknown tool or patient)."""
        if request_id is None:
            request_id, trace_id = request_ids()
        metrics.TOOL_CALLS.labels(tool, "error").inc()
        await self._write(
            AuditRecord(
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
        )

    async def _failed(self, call: Call, exc: MCPFhirError) -> None:
        """A failure after an allow: audited as an error (best effort; the error itself still goes out)."""
        metrics.TOOL_CALLS.labels(call.tool.name, "error").inc()
        try:
            await self._write(call.record("error", error_code=exc.code))
        except AuditUnavailable:
            log.error(
                "audit record for a failed call could not be written", extra={"request_id": call.request_id}
            )

    async def _write(self, record: AuditRecord) -> None:
        """Step 8: make the record durable. Any failure is `AuditUnavailable`, and no data leaves."""
        try:
            await self.app.audit.record(record)
        except AuditUnavailable:
            raise
        except Exception as exc:
            metrics.AUDIT_FAILURES.inc()
            raise AuditUnavailable("the audit record could not be written") from exc
