"""The one error tree of mcp-fhir.

Every error the sidecar raises on purpose is a leaf of this tree, and every leaf
carries a stable ``code`` that clients, tests and the audit trail rely on. Messages
are for people; codes are the contract. No message ever holds PHI, a token or a
secret, and no stack trace leaves the process.

    MCPFhirError
    ├── ConfigError                      config_invalid
    ├── AuthenticationError              unauthenticated
    ├── InvalidArgument                  invalid_argument
    ├── UnknownPatient                   unknown_patient
    ├── IdMapUnavailable                 idmap_unavailable
    ├── ConfirmationRequired             confirmation_required
    │   └── ConfirmationDeclined         confirmation_declined
    ├── PolicyError
    │   ├── PolicyDenied                 policy_denied
    │   └── PolicyUnavailable            opa_unavailable
    │       ├── PolicyTimeout            opa_timeout
    │       ├── PolicyUndefined          opa_undefined
    │       └── PolicyMalformed          opa_malformed
    ├── UpstreamError
    │   ├── UpstreamUnavailable          upstream_unavailable
    │   │   ├── UpstreamTimeout          upstream_timeout
    │   │   └── CircuitOpen              upstream_circuit_open
    │   ├── UpstreamRateLimited          upstream_rate_limited
    │   ├── UpstreamAuthError            upstream_auth_failed
    │   ├── UpstreamBadResponse          upstream_bad_response
    │   ├── UpstreamRejected             upstream_rejected
    │   │   └── ResourceNotFound         resource_not_found
    │   └── ToolUnavailable              tool_unavailable
    └── AuditUnavailable                 audit_unavailable

Lower-level exceptions (aiohttp, httpx2, OPA client, database drivers) are
translated into this tree at one seam per dependency, always with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [  # noqa: RUF022 (in the order of the tree above, not the alphabet)
    "MCPFhirError",
    "ConfigError",
    "AuthenticationError",
    "InvalidArgument",
    "UnknownPatient",
    "IdMapUnavailable",
    "ConfirmationRequired",
    "ConfirmationDeclined",
    "PolicyError",
    "PolicyDenied",
    "PolicyUnavailable",
    "PolicyTimeout",
    "PolicyUndefined",
    "PolicyMalformed",
    "UpstreamError",
    "UpstreamUnavailable",
    "UpstreamTimeout",
    "CircuitOpen",
    "UpstreamRateLimited",
    "UpstreamAuthError",
    "UpstreamBadResponse",
    "UpstreamRejected",
    "ResourceNotFound",
    "ToolUnavailable",
    "AuditUnavailable",
]


class MCPFhirError(Exception):
    """The root of every error the sidecar raises on purpose."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """A PHI-free, JSON-ready view: the code, the message and the safe details."""
        return {"code": self.code, "message": self.message, **self.details}

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ConfigError(MCPFhirError):
    """A setting is missing, malformed or contradicts another. The message names the key."""

    code = "config_invalid"

    def __init__(self, key: str, rule: str) -> None:
        super().__init__(f"{key}: {rule}", key=key)
        self.key = key
        self.rule = rule


class AuthenticationError(MCPFhirError):
    """The caller could not be authenticated."""

    code = "unauthenticated"


class InvalidArgument(MCPFhirError):
    """A tool argument broke a rule. The message names the argument and the rule, never its value."""

    code = "invalid_argument"

    def __init__(self, argument: str, rule: str) -> None:
        super().__init__(f"argument '{argument}': {rule}", argument=argument)
        self.argument = argument
        self.rule = rule


class ConfirmationRequired(MCPFhirError):
    """The policy requires a person to confirm this write, and none did: the client cannot ask one
    (no elicitation support), or the question expired. Nothing was written."""

    code = "confirmation_required"


class ConfirmationDeclined(ConfirmationRequired):
    """The person asked to confirm this write declined or cancelled. Nothing was written."""

    code = "confirmation_declined"


class UnknownPatient(MCPFhirError):
    """A patient id has no mapping to a canonical id, or none on the backend. We never guess."""

    code = "unknown_patient"


class IdMapUnavailable(MCPFhirError):
    """The patient-id map's database failed at run time: the call cannot be canonicalised, so it fails closed."""

    code = "idmap_unavailable"


class PolicyError(MCPFhirError):
    """Any outcome of the policy step other than an allow."""

    code = "policy_error"

    def __init__(self, message: str, *, decision_id: str | None = None, **details: Any) -> None:
        super().__init__(message, decision_id=decision_id, **details)
        self.decision_id = decision_id


class PolicyDenied(PolicyError):
    """The policy said no. Carries its reason codes and the decision id."""

    code = "policy_denied"

    def __init__(self, reasons: Sequence[Mapping[str, Any]], *, decision_id: str | None = None) -> None:
        codes = [str(r.get("code", "UNSPECIFIED")) for r in reasons] or ["UNSPECIFIED"]
        super().__init__("denied by policy: " + ", ".join(codes), decision_id=decision_id, reasons=codes)
        self.reasons = codes


class PolicyUnavailable(PolicyError):
    """OPA could not be reached or failed; the call is denied (fail closed)."""

    code = "opa_unavailable"


class PolicyTimeout(PolicyUnavailable):
    """OPA did not answer within the decision timeout; the call is denied."""

    code = "opa_timeout"


class PolicyUndefined(PolicyUnavailable):
    """OPA answered with no result: the decision rule is undefined; the call is denied."""

    code = "opa_undefined"


class PolicyMalformed(PolicyUnavailable):
    """OPA answered with a result that does not match the decision contract; the call is denied."""

    code = "opa_malformed"


class UpstreamError(MCPFhirError):
    """The EHR could not give a trustworthy answer."""

    code = "upstream_error"
    retry_after: str | float | None = None  # the EHR's Retry-After (429, 503, ...), when it sent one


class UpstreamUnavailable(UpstreamError):
    """The EHR could not be reached or kept failing."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamUnavailable):
    """The EHR did not answer in time."""

    code = "upstream_timeout"


class CircuitOpen(UpstreamUnavailable):
    """The backend's circuit breaker is open: we fail fast instead of piling on."""

    code = "upstream_circuit_open"


class UpstreamRateLimited(UpstreamError):
    """The backend's rate limit would be exceeded beyond the bounded wait."""

    code = "upstream_rate_limited"


class UpstreamAuthError(UpstreamError):
    """The sidecar could not authenticate to the EHR (SMART Backend Services)."""

    code = "upstream_auth_failed"


class UpstreamBadResponse(UpstreamError):
    """The EHR answered with something that is not valid FHIR (truncated, garbage, wrong type)."""

    code = "upstream_bad_response"


class UpstreamRejected(UpstreamError):
    """The EHR refused the request (4xx other than auth and rate limits)."""

    code = "upstream_rejected"


class ResourceNotFound(UpstreamRejected):
    """The EHR has no such resource (HTTP 404 or 410)."""

    code = "resource_not_found"


class ToolUnavailable(UpstreamError):
    """The EHR did not grant the scopes this tool needs, so it is not offered."""

    code = "tool_unavailable"


class AuditUnavailable(MCPFhirError):
    """The audit record could not be made durable, so no data leaves (fail closed)."""

    code = "audit_unavailable"
