"""`FakeAuditTrail`: the in-package fake of `AuditTrail`, for unit tests of other modules.

It has the trail's surface (`record`, `check`, `query`, `disclosures`, `close`) and its failure contract:
a write that cannot be made durable raises `AuditUnavailable`. Records stay in memory, in
order; `query` filters them with the real `AuditQuery` and pages them like the real trail.
No chain, signature or disk: tests of those use `AuditTrail` itself.

Test controls: `fail` makes every write (and `check`) fail; `gate`, when set, holds every
write until the event is set, and `waiting` counts the writes it holds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from mcp_fhir._exceptions import AuditUnavailable
from mcp_fhir.audit.query import AuditQuery, check_limit, page, parse_cursor
from mcp_fhir.audit.record import AuditRecord

__all__ = ["FakeAuditTrail"]


@dataclass
class FakeAuditTrail:
    """Audit records in memory, with the real trail's contract. See the module docstring."""

    records: list[AuditRecord] = field(default_factory=list)
    fail: bool = False
    gate: asyncio.Event | None = None
    waiting: int = 0
    queries: list[AuditQuery] = field(default_factory=list)
    disclosure_requests: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"FakeAuditTrail(records={len(self.records)}, fail={self.fail})"

    async def record(self, rec: AuditRecord) -> str:
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
        if self.fail:
            raise AuditUnavailable("the fake audit trail is failing")
        self.records.append(rec)
        return str(len(self.records))

    async def check(self) -> bool:
        return not self.fail

    async def query(
        self, f: AuditQuery, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.queries.append(f)
        after = parse_cursor(cursor)
        stored = ((seq, rec.to_dict()) for seq, rec in enumerate(self.records, start=1) if seq > after)
        return page(stored, f, limit=check_limit(limit))

    async def disclosures(self, patient: str, *, since: str | None = None, until: str | None = None) -> Any:
        """A report with the trail's shape and no accesses (no chain to verify: the real trail's is tested)."""
        from mcp_fhir.audit.disclosures import DisclosureReport
        from mcp_fhir.audit.record import utc_now_ms

        self.disclosure_requests.append(patient)
        return DisclosureReport(patient, since, until, utc_now_ms(), trail={"verified": False, "fake": True})

    def of_kind(self, kind: str = "access") -> list[AuditRecord]:
        """The records of one kind, in the order written."""
        return [r for r in self.records if r.kind == kind]

    async def close(self) -> None:
        return None
