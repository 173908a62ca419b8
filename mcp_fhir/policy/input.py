"""The decision input: the facts Python hands to OPA, in the shape `policies/README.md` documents.

Python passes facts only. It never names a role, a purpose or a label: the subject's raw
claims, the tool, the canonical patient, the validated parameters and the context go in;
everything else is decided in Rego.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mcp_fhir.agent_auth.subject import Subject


def utc_now_rfc3339(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


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
    """Build the input for `data.mcp_fhir.authz.decision`."""
    return {
        "subject": subject.to_input(),
        "action": {"tool": tool, "operation": operation, "resource_type": resource_type},
        "resource": {"patient": patient, "params": dict(params)},
        "context": {
            "purpose": purpose,
            "time": utc_now_rfc3339(now),
            "break_glass": {"reason": break_glass_reason} if break_glass_reason else None,
            "backend": backend,
            "request_id": request_id,
        },
    }


def visible_tools_input(subject: Subject, *, backend: str) -> dict[str, Any]:
    """The input for `data.mcp_fhir.authz.visible_tools`."""
    return {"subject": subject.to_input(), "context": {"backend": backend, "time": utc_now_rfc3339()}}
