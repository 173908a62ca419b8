"""Searching the trail: filters, decoding of stored entries, and cursor paging.

Used by ``AuditTrail.query`` (the ``search_audit_log`` tool) and by the CLI. The scan is
sequential in ``seq`` order; the cursor is the last ``seq`` returned, so pages are stable
while the log grows. Encrypted entries are decrypted when a key is given and skipped otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mcp_fhir._exceptions import InvalidArgument
from mcp_fhir.audit.crypto import DecryptionFailed, RecordCipher
from mcp_fhir.audit.record import parse_ts

__all__ = ["DEFAULT_QUERY_LIMIT", "MAX_QUERY_LIMIT", "AuditQuery", "decode_entries", "page"]

DEFAULT_QUERY_LIMIT = 50
MAX_QUERY_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters, all optional and combined with AND. ``since`` is inclusive, ``until`` exclusive."""

    patient: str | None = None
    subject_id: str | None = None
    since: str | None = None
    until: str | None = None
    result: str | None = None
    purpose: str | None = None
    alert: str | None = None
    tool: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        for key in ("since", "until"):
            value = getattr(self, key)
            if value is not None:
                try:
                    parse_ts(value)
                except ValueError as exc:
                    raise InvalidArgument(key, "must be an RFC 3339 timestamp") from exc

    def _bounds(self) -> tuple[datetime | None, datetime | None]:
        return (
            parse_ts(self.since) if self.since else None,
            parse_ts(self.until) if self.until else None,
        )

    def matches(self, record: dict[str, Any]) -> bool:
        """Does one decoded record pass every filter?"""
        for key in ("patient", "subject_id", "result", "purpose", "tool", "kind"):
            wanted = getattr(self, key)
            if wanted is not None and record.get(key) != wanted:
                return False
        if self.alert is not None and self.alert not in (record.get("alerts") or ()):
            return False
        since, until = self._bounds()
        if since or until:
            try:
                ts = parse_ts(str(record.get("ts")))
            except ValueError:
                return False
            if (since and ts < since) or (until and ts >= until):
                return False
        return True


def decode_entries(
    entries: Iterable[dict[str, Any]], cipher: RecordCipher | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(seq, record)`` for every record entry; checkpoints and recovery entries are skipped."""
    for entry in entries:
        if "record" in entry:
            yield int(entry["seq"]), entry["record"]
        elif "ct" in entry and cipher is not None:
            try:
                yield int(entry["seq"]), cipher.decrypt(entry)
            except DecryptionFailed:
                continue


def parse_cursor(cursor: str | None) -> int:
    """The seq after which to continue; InvalidArgument for anything not made by ``page``."""
    if cursor is None or cursor == "":
        return 0
    if not cursor.isdigit() or len(cursor) > 19:
        raise InvalidArgument("cursor", "must be a cursor returned by a previous query")
    return int(cursor)


def check_limit(limit: int) -> int:
    """Validate a page size."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_QUERY_LIMIT:
        raise InvalidArgument("limit", f"must be an integer from 1 to {MAX_QUERY_LIMIT}")
    return limit


def page(
    records: Iterable[tuple[int, dict[str, Any]]], f: AuditQuery, *, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """The first ``limit`` matches (each with its ``seq``) and the cursor for the next page, or None."""
    out: list[dict[str, Any]] = []
    for seq, record in records:
        if not f.matches(record):
            continue
        if len(out) == limit:
            return out, str(out[-1]["seq"])
        out.append({"seq": seq, **record})
    return out, None
