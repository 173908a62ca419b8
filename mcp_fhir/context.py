"""The typed lifespan context: a plain bag of the long-lived clients the call path uses, opened once.

It holds no call-path logic: deciding is `policy/decide.py`, the steps are `tools/callpath.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mcp_fhir.activity import ActivityCounters
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.consent import ConsentReader
from mcp_fhir.ehr.client import EHRClient
from mcp_fhir.policy.decide import Decider
from mcp_fhir.policy.engine import PolicyEngine


class AuditSink(Protocol):
    """What the call path needs of the audit trail (`AuditTrail`, or `FakeAuditTrail` in tests)."""

    async def record(self, rec: AuditRecord) -> str: ...
    async def check(self) -> bool: ...
    async def query(
        self, f: AuditQuery, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]: ...
    async def close(self) -> None: ...

    async def disclosures(self, patient: str, *, since: str | None = None, until: str | None = None) -> Any:
        """The patient's accounting of disclosures (`DisclosureReport`), once the trail verifies."""
        ...


class PatientIds(Protocol):
    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str: ...


class IdentityIds:
    """The explicit `idmap.kind: identity` choice: canonical ids are the backend's FHIR ids."""

    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str:
        return canonical

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Limits:
    """Named, finite bounds on what one call may ask for and return."""

    default_page_size: int = 20
    max_page_size: int = 100
    max_range_days: int = 3660
    max_note_chars: int = 20_000
    summary_items_per_section: int = 10


@dataclass(frozen=True, slots=True)
class Purpose:
    """One purpose of use, as the policy's data publishes it (for the `purpose` parameter's enum)."""

    name: str
    description: str


@dataclass(repr=False)
class AppContext:
    """What the lifespan yields: the decider (policy engines), EHR clients, patient-id map and audit trail."""

    decider: Decider
    backends: Mapping[str, EHRClient]
    default_backend: str
    idmap: PatientIds
    audit: AuditSink
    local_subject: Subject | None = None
    subject_from_access_token: Callable[[Any], Subject] = field(default=lambda _t: _no_verifier())
    limits: Limits = field(default_factory=Limits)
    continuation_key: bytes = b""
    flag_injection: bool = True
    enabled_tools: frozenset[str] = frozenset()
    unavailable_tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    purposes: tuple[Purpose, ...] = ()
    # Patient consent (None when `consent.enabled` is false). The EHR source is keyed by the
    # backend's patient id, a local store by the canonical id.
    consent: ConsentReader | None = None
    consent_by_backend_id: bool = False
    # Per-subject activity counters (None when `activity.enabled` is false).
    activity: ActivityCounters | None = None

    def __repr__(self) -> str:
        # The clients may hold data (a fake EHR holds resources): a repr names them, nothing more.
        return f"AppContext(backends={sorted(self.backends)!r}, default_backend={self.default_backend!r})"

    @property
    def engine(self) -> PolicyEngine:
        """The active policy engine (readiness asks it about its health)."""
        return self.decider.engine

    def backend(self, name: str | None = None) -> EHRClient:
        return self.backends[name or self.default_backend]


def _no_verifier() -> Subject:
    raise RuntimeError("no token verifier is configured")
