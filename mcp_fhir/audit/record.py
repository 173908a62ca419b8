"""The audit record: one immutable, PHI-minimal, deterministically serialisable fact.

The caller (the server) fills every field; the trail never derives meaning from them.
``patient`` is the only PHI allowed, and only as the canonical patient id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["RECORD_KINDS", "RECORD_RESULTS", "AuditRecord", "parse_ts", "utc_now_ms"]

RECORD_KINDS = frozenset({"access", "alert", "auth_failure", "shadow_divergence"})
RECORD_RESULTS = frozenset({"allowed", "denied", "error"})


def utc_now_ms() -> str:
    """Now, in UTC, RFC 3339 to the millisecond: ``2026-11-25T03:04:05.123Z``."""
    return format_ts(datetime.now(UTC))


def format_ts(moment: datetime) -> str:
    """A timezone-aware datetime as RFC 3339 UTC to the millisecond."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset; a bare date means midnight UTC)."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited event. ``to_dict`` gives the JSON form that is hashed and stored."""

    ts: str
    request_id: str
    kind: str = "access"
    result: str = "allowed"
    trace_id: str | None = None
    subject_id: str | None = None
    on_behalf_of: str | None = None
    authn: str | None = None
    tool: str | None = None
    resource_type: str | None = None
    operation: str | None = None
    patient: str | None = None
    backend_patient: str | None = None
    backend: str | None = None
    scopes: tuple[str, ...] = ()
    purpose: str | None = None
    break_glass_reason: str | None = None
    reason_codes: tuple[str, ...] = ()
    error_code: str | None = None
    sensitivity: str | None = None
    alerts: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    returned_count: int | None = None
    filtered_count: int | None = None
    cache: str | None = None
    decision_id: str | None = None
    policy_revision: str | None = None
    decision_input: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"unknown audit record kind (allowed: {sorted(RECORD_KINDS)})")
        if self.result not in RECORD_RESULTS:
            raise ValueError(f"unknown audit record result (allowed: {sorted(RECORD_RESULTS)})")
        for name in ("scopes", "reason_codes", "alerts"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def __repr__(self) -> str:
        # Redacted by construction: no patient id, params or decision input in a repr.
        return f"AuditRecord(kind={self.kind!r}, request_id={self.request_id!r}, result={self.result!r})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        """Rebuild a record from its stored form; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for name in ("scopes", "reason_codes", "alerts"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name] or ())
        return cls(**kwargs)
