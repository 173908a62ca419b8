"""An accounting of disclosures for one patient, built only from a trail that verifies (issue #21 §2).

For a patient and an optional period, the report answers, from the trail's ``access`` records:

* **who**: the agent (``subject_id``) and the person it acted for (``on_behalf_of``);
* **when**: the record's timestamp;
* **what**: the tool, the resource type, the interaction, how many resources were returned and how
  many were withheld (``filtered_count``);
* **why**: the declared or bound purpose;
* **break-glass**: every access made under break-glass, with its stated reason;
* **denied**: every attempt the policy refused, with its reason codes (and calls that failed).

The trail is verified in the same pass that collects the records (one read, not two): the entries
stream through ``verify_entries`` and the matching records are kept aside; if verification fails,
they are thrown away and ``TrailNotVerified`` is raised. No report is ever built from a trail that
does not verify, whatever the caller.

Renderers: ``render(report, "md" | "html" | "json" | "fhir")``. Text that came from an agent
(``break_glass_reason``, ids) is escaped for the format: HTML-escaped in HTML; in Markdown, table
cells are flattened to one line and their markup characters escaped. ``fhir`` is a FHIR R4
``collection`` Bundle of the patient's AuditEvents (``export_fhir``), the form a FHIR-native
privacy officer's tool reads.

The call path can expose the same report as an MCP tool: ``AuditTrail.disclosures(...)`` returns a
``DisclosureReport`` from the trail's own sink, pinned keys and witness.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from mcp_fhir.audit.crypto import DecryptionFailed, RecordCipher
from mcp_fhir.audit.export_fhir import to_audit_event, to_bundle
from mcp_fhir.audit.record import parse_ts, utc_now_ms
from mcp_fhir.audit.verify import Item, Progress, PublicKeyLike, VerifyReport, verify_entries

__all__ = [
    "FORMATS",
    "DisclosureReport",
    "TrailNotVerified",
    "build_disclosures",
    "render",
]

FORMATS = ("md", "html", "json", "fhir")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


class TrailNotVerified(Exception):
    """The trail did not verify; the report was not built. ``report`` says why."""

    def __init__(self, report: VerifyReport) -> None:
        problem = report.problem
        where = f"{problem.kind} at seq {problem.seq}" if problem else "unknown problem"
        super().__init__(f"the audit trail does not verify ({where}); no report from it")
        self.report = report


@dataclass(slots=True)
class Access:
    """One line of the accounting."""

    seq: int
    ts: str
    result: str
    agent: str | None
    on_behalf_of: str | None
    tool: str | None
    resource_type: str | None
    operation: str | None
    purpose: str | None
    returned: int | None
    withheld: int | None
    break_glass_reason: str | None
    reason_codes: list[str]
    decision_id: str | None


@dataclass(slots=True)
class DisclosureReport:
    """The accounting for one patient over one period, with how the trail verified."""

    patient: str
    since: str | None
    until: str | None
    generated: str
    trail: dict[str, Any]
    accesses: list[Access] = field(default_factory=list)
    denied: list[Access] = field(default_factory=list)
    errors: list[Access] = field(default_factory=list)

    @property
    def break_glass(self) -> list[Access]:
        return [a for a in self.accesses if a.break_glass_reason]

    def by_person(self) -> list[tuple[str, str, int]]:
        """(agent, person acted for, allowed accesses), most first."""
        counts = Counter((a.agent or "-", a.on_behalf_of or "-") for a in self.accesses)
        return [(agent, person, n) for (agent, person), n in counts.most_common()]

    def by_resource_type(self) -> list[tuple[str, int, int, int]]:
        """(resource type, accesses, resources returned, resources withheld)."""
        rows: dict[str, list[int]] = {}
        for a in self.accesses:
            row = rows.setdefault(a.resource_type or "-", [0, 0, 0])
            row[0] += 1
            row[1] += a.returned or 0
            row[2] += a.withheld or 0
        return [(t, *v) for t, v in sorted(rows.items())]  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "period": {"from": self.since, "to": self.until},
            "generated": self.generated,
            "trail": self.trail,
            "summary": {
                "accesses": len(self.accesses),
                "denied": len(self.denied),
                "errors": len(self.errors),
                "break_glass": len(self.break_glass),
                "by_person": [{"agent": a, "on_behalf_of": p, "accesses": n} for a, p, n in self.by_person()],
                "by_resource_type": [
                    {"resource_type": t, "accesses": n, "returned": r, "withheld": w}
                    for t, n, r, w in self.by_resource_type()
                ],
            },
            "accesses": [asdict(a) for a in self.accesses],
            "break_glass": [asdict(a) for a in self.break_glass],
            "denied": [asdict(a) for a in self.denied],
            "errors": [asdict(a) for a in self.errors],
        }


def _access(seq: int, r: dict[str, Any]) -> Access:
    return Access(
        seq=seq, ts=str(r.get("ts")), result=str(r.get("result")), agent=r.get("subject_id"),
        on_behalf_of=r.get("on_behalf_of"), tool=r.get("tool"), resource_type=r.get("resource_type"),
        operation=r.get("operation"), purpose=r.get("purpose"), returned=r.get("returned_count"),
        withheld=r.get("filtered_count"), break_glass_reason=r.get("break_glass_reason"),
        reason_codes=list(r.get("reason_codes") or []), decision_id=r.get("decision_id"),
    )  # fmt: skip


class _Collector:
    """Taps the verification stream: keeps the patient's access records, decrypting when it can."""

    def __init__(
        self, patient: str, since: datetime | None, until: datetime | None, cipher: RecordCipher | None
    ) -> None:
        self.patient = patient
        self.since, self.until = since, until
        self.cipher = cipher
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.undecrypted = 0

    def tap(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            entry = item[1]
            if entry is not None and not item[2]:
                self._look(entry)
            yield item

    def _look(self, entry: dict[str, Any]) -> None:
        record = entry.get("record")
        if record is None and "ct" in entry:
            if self.cipher is None:
                self.undecrypted += 1
                return
            try:
                record = self.cipher.decrypt(entry)
            except DecryptionFailed:
                return  # verify reports it
        if not isinstance(record, dict) or record.get("kind") != "access":
            return
        if record.get("patient") != self.patient:
            return
        if self.since or self.until:
            try:
                ts = parse_ts(str(record.get("ts")))
            except ValueError:
                return
            if (self.since and ts < self.since) or (self.until and ts >= self.until):
                return
        self.rows.append((int(entry.get("seq", 0)), record))


def build_disclosures(
    items: Iterable[Item],
    *,
    patient: str,
    public_key: PublicKeyLike,
    since: str | None = None,
    until: str | None = None,
    witness: dict[str, Any] | None = None,
    require_witness: bool = False,
    accept_recoveries: Iterable[int] = (),
    encryption_key: RecordCipher | None = None,
    progress: Progress | None = None,
    clock: Callable[[], str] = utc_now_ms,
) -> DisclosureReport:
    """Verify the trail and build the patient's accounting in one pass; ``TrailNotVerified`` otherwise."""
    collector = _Collector(
        patient, parse_ts(since) if since else None, parse_ts(until) if until else None, encryption_key
    )
    verified = verify_entries(
        collector.tap(items), public_key=public_key, encryption_key=encryption_key, progress=progress,
        witness=witness, require_witness=require_witness, accept_recoveries=accept_recoveries,
    )  # fmt: skip
    if not verified.ok:
        raise TrailNotVerified(verified)
    trail = {
        "verified": True, "entries": verified.entries, "last_seq": verified.last_seq,
        "checkpoints": verified.checkpoints, "key_ids": verified.key_ids,
        "witness_checked": verified.witness_checked, "witness_seq": verified.witness_seq,
        "unvouched_accepted": verified.unvouched, "encrypted_records_not_read": collector.undecrypted,
    }  # fmt: skip
    report = DisclosureReport(patient=patient, since=since, until=until, generated=clock(), trail=trail)
    for seq, record in collector.rows:
        access = _access(seq, record)
        {"allowed": report.accesses, "denied": report.denied}.get(access.result, report.errors).append(access)
    return report


# -- rendering ---------------------------------------------------------------------------------


def render(report: DisclosureReport, fmt: str) -> str:
    """The report as Markdown, HTML, JSON or a FHIR Bundle of AuditEvents."""
    if fmt == "json":
        return json.dumps(report.to_dict(), sort_keys=True, indent=2) + "\n"
    if fmt == "fhir":
        ordered = sorted(report.accesses + report.denied + report.errors, key=lambda a: a.seq)
        events = [
            to_audit_event(_as_record(a, report.patient), seq=a.seq, writer="mcp-fhir") for a in ordered
        ]
        return json.dumps(to_bundle(events), sort_keys=True) + "\n"
    if fmt == "md":
        return _markdown(report)
    if fmt == "html":
        return _html(report)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}")


def _as_record(a: Access, patient: str) -> dict[str, Any]:
    return {
        "patient": patient, "kind": "access", "ts": a.ts, "result": a.result, "subject_id": a.agent,
        "on_behalf_of": a.on_behalf_of, "tool": a.tool, "resource_type": a.resource_type,
        "operation": a.operation, "purpose": a.purpose, "returned_count": a.returned,
        "filtered_count": a.withheld, "break_glass_reason": a.break_glass_reason,
        "reason_codes": a.reason_codes, "decision_id": a.decision_id, "request_id": f"seq-{a.seq}",
    }  # fmt: skip


def _md(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = " ".join(text.split())  # one line: a cell cannot break the table
    return _MD_SPECIAL.sub(r"\\\1", text)


def _period(report: DisclosureReport) -> str:
    return f"{report.since or 'the start of the trail'} to {report.until or 'now'}"


def _sections(report: DisclosureReport) -> list[tuple[str, list[str], list[list[Any]]]]:
    access_cols = [
        "When",
        "Agent",
        "On behalf of",
        "Tool",
        "Resource type",
        "Returned",
        "Withheld",
        "Purpose",
    ]
    return [
        ("Who accessed the record", ["Agent", "On behalf of", "Accesses"], [list(r) for r in report.by_person()]),
        ("What was accessed", ["Resource type", "Accesses", "Returned", "Withheld"],
         [list(r) for r in report.by_resource_type()]),
        ("Every access", access_cols,
         [[a.ts, a.agent, a.on_behalf_of, a.tool, a.resource_type, a.returned, a.withheld, a.purpose]
          for a in report.accesses]),
        ("Break-glass accesses", ["When", "Agent", "On behalf of", "Tool", "Reason"],
         [[a.ts, a.agent, a.on_behalf_of, a.tool, a.break_glass_reason] for a in report.break_glass]),
        ("Denied attempts", ["When", "Agent", "On behalf of", "Tool", "Purpose", "Reasons"],
         [[a.ts, a.agent, a.on_behalf_of, a.tool, a.purpose, ", ".join(a.reason_codes)] for a in report.denied]),
        ("Calls that failed", ["When", "Agent", "Tool", "Reasons"],
         [[a.ts, a.agent, a.tool, ", ".join(a.reason_codes)] for a in report.errors]),
    ]  # fmt: skip


def _trail_line(report: DisclosureReport) -> str:
    t = report.trail
    witness = f"witness at seq {t['witness_seq']}" if t["witness_checked"] else "no witness checked"
    return (
        f"The audit trail verified before this report was built: {t['entries']} entries to seq "
        f"{t['last_seq']}, {t['checkpoints']} signed checkpoints (keys {', '.join(t['key_ids']) or '-'}), "
        f"{witness}."
    )


def _markdown(report: DisclosureReport) -> str:
    out = [
        f"# Accounting of disclosures: patient {_md(report.patient)}",
        "",
        f"Period: {_md(_period(report))}. Generated {_md(report.generated)}.",
        "",
        _md(_trail_line(report)),
        "",
        f"Summary: {len(report.accesses)} accesses, {len(report.break_glass)} under break-glass, "
        f"{len(report.denied)} denied attempts, {len(report.errors)} failed calls.",
    ]
    for title, cols, rows in _sections(report):
        out += ["", f"## {title}", ""]
        if not rows:
            out.append("None.")
            continue
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        out += ["| " + " | ".join(_md(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2rem;color:#1b1b1b}"
    "table{border-collapse:collapse;margin:.5rem 0 1.5rem}"
    "th,td{border:1px solid #c8c8c8;padding:.3rem .6rem;text-align:left;font-size:.9rem}"
    "th{background:#eef2f6}.verified{color:#0a6b2b}.none{color:#666}"
)


def _html(report: DisclosureReport) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Accounting of disclosures: patient {e(report.patient)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Accounting of disclosures: patient {e(report.patient)}</h1>",
        f"<p>Period: {e(_period(report))}. Generated {e(report.generated)}.</p>",
        f'<p class="verified">{e(_trail_line(report))}</p>',
        f"<p>Summary: {len(report.accesses)} accesses, {len(report.break_glass)} under break-glass, "
        f"{len(report.denied)} denied attempts, {len(report.errors)} failed calls.</p>",
    ]
    for title, cols, rows in _sections(report):
        parts.append(f"<h2>{e(title)}</h2>")
        if not rows:
            parts.append('<p class="none">None.</p>')
            continue
        parts.append(
            "<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr></thead><tbody>"
        )
        for row in rows:
            cells = "".join(f"<td>{e('-' if v is None else str(v))}</td>" for v in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
