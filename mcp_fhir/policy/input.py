"""The decision input: the facts Python hands to OPA, in the shape `policies/README.md` documents.

Python passes facts only. It never names a role, a purpose or a label: the subject's raw
claims, the tool, the canonical patient, the validated parameters and the context go in;
everything else is decided in Rego. `DecisionInput` is the typed form; `to_opa()` is the
JSON object OPA receives. Its repr names the tool and the request, never the patient,
the parameters or the break-glass reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mcp_fhir.agent_auth.subject import Subject


def utc_now_rfc3339(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class DecisionInput:
    """The input for `data.mcp_fhir.authz.decision`, typed. Every narrowing argument is in `params`."""

    subject: Subject
    tool: str
    operation: str
    resource_type: str
    patient: str | None
    params: Mapping[str, Any]
    purpose: str | None
    break_glass_reason: str | None
    backend: str
    request_id: str
    time: str = field(default_factory=utc_now_rfc3339)
    # Set only when the feature is on: absent from `to_opa()` otherwise, so the input is unchanged.
    consent: Mapping[str, Any] | None = None  # `ConsentReader.context`: {status, provisions}
    activity: Mapping[str, Any] | None = None  # `ActivityCounters.observe`: window -> counts

    def __repr__(self) -> str:
        return (
            f"DecisionInput(tool={self.tool!r}, resource_type={self.resource_type!r}, "
            f"request_id={self.request_id!r})"
        )

    def to_opa(self) -> dict[str, Any]:
        """The JSON object OPA receives (and the audit record keeps).

        `context.consent` and `context.activity` appear only when set (consent or activity
        enabled), so with both features off every input is byte-identical to the contract's.
        """
        out: dict[str, Any] = {
            "subject": self.subject.to_input(),
            "action": {"tool": self.tool, "operation": self.operation, "resource_type": self.resource_type},
            "resource": {"patient": self.patient, "params": dict(self.params)},
            "context": {
                "purpose": self.purpose,
                "time": self.time,
                "break_glass": {"reason": self.break_glass_reason} if self.break_glass_reason else None,
                "backend": self.backend,
                "request_id": self.request_id,
            },
        }
        if self.consent is not None:
            out["context"]["consent"] = dict(self.consent)
        if self.activity is not None:
            out["context"]["activity"] = dict(self.activity)
        return out


def decision_input(
    *,
    subject: Subject,
    tool: str,
    operation: str,
    resource_type: str,
    patient: str | None,
    params: Mapping[str, Any],
    purpose: str | None,
    break_glass_reason: str | None,
    backend: str,
    request_id: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Build the input for `data.mcp_fhir.authz.decision` as OPA receives it."""
    return DecisionInput(
        subject=subject,
        tool=tool,
        operation=operation,
        resource_type=resource_type,
        patient=patient,
        params=params,
        purpose=purpose,
        break_glass_reason=break_glass_reason,
        backend=backend,
        request_id=request_id,
        time=utc_now_rfc3339(now),
    ).to_opa()


def visible_tools_input(subject: Subject, *, backend: str) -> dict[str, Any]:
    """The input for `data.mcp_fhir.authz.visible_tools`."""
    return {"subject": subject.to_input(), "context": {"backend": backend, "time": utc_now_rfc3339()}}
