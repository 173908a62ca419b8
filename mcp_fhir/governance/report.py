"""Render a `DiffReport`: markdown for a pull request, JSON for machines, one self-contained HTML page.

Every renderer shows the same facts: the verdict, any change to `approvals.yaml`, counts per class,
then one row per group (class, role, tool, purpose, reason code) with its count, the kinds of
change, whether it is approved, and a few examples. The markdown summary (`to_markdown(report,
max_chars=N)`) fits a pull-request comment; the full markdown, the JSON and the HTML page keep every
group. The HTML page has no external assets (inline CSS, no scripts, no fonts, no images).
"""

from __future__ import annotations

import html
import json
from typing import Any

from mcp_fhir.governance.diff import Change, DiffReport, Group

__all__ = ["CHANGED_LEGEND", "REASON_LEGEND", "to_html", "to_json", "to_markdown"]
_ICON = {"widening": "🔓", "narrowing": "🔒", "changed": "✳️"}


def _status(group: Group) -> str:
    if group.classification != "widening":
        return ""
    if group.unapproved:
        return f"UNAPPROVED ({group.unapproved})"
    return "approved: " + "; ".join(sorted(group.approved_by))


def _example(change: Change) -> str:
    facets = "; ".join(f"{k}: {d}" for k, d in change.facets)
    return f"[{change.case.source}] {change.case.label} — {facets}"


def _change_dict(change: Change) -> dict[str, Any]:
    return {
        "source": change.case.source,
        "label": change.case.label,
        "classification": change.classification,
        "facets": [{"kind": k, "detail": d} for k, d in change.facets],
        "input": change.case.input,
        "base": change.base,
        "head": change.head,
    }


def to_json(report: DiffReport) -> dict[str, Any]:
    """A JSON-ready dict of the whole report (every group, its examples with both decisions)."""
    return {
        "base": report.base_label,
        "head": report.head_label,
        "ok": report.ok,
        "evaluated": report.evaluated,
        "by_source": report.by_source,
        "seconds": round(report.seconds, 3),
        "counts": {k: report.count(k) for k in ("widening", "narrowing", "changed")},
        "unapproved_widenings": report.unapproved_widenings,
        "expired_approvals": report.expired_approvals,
        "approvals_source": report.approvals_source,
        "approvals_changes": [
            {"kind": c.kind, "id": c.id, "detail": c.detail, "needs_review": c.needs_review}
            for c in report.approvals_changes
        ],
        "groups": [
            {
                "classification": g.classification,
                "role": g.role,
                "tool": g.tool,
                "purpose": g.purpose,
                "reason": g.reason,
                "count": g.count,
                "kinds": sorted(g.kinds),
                "unapproved": g.unapproved,
                "approved_by": sorted(g.approved_by),
                "roles": sorted(g.roles),
                "tools": sorted(g.tools),
                "purposes": sorted(g.purposes),
                "examples": [_change_dict(c) for c in g.examples],
            }
            for g in report.groups
        ],
    }


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


REASON_LEGEND = (
    "**reason**: the deny reason code(s) behind the change. A widening lists the codes the base denied "
    "with and the head no longer gives; a narrowing the codes the head now denies with; a *changed* row "
    "`base codes → head codes`; `-` when both sides allow and only obligations or audit differ."
)
CHANGED_LEGEND = (
    "**changed** rows grant the same access on both sides (still denied, or still allowed with the same "
    "obligations): only the deny reason codes or the audit sensitivity/alerts differ. They never need "
    "approval and are grouped by what changed, across roles, tools and purposes."
)


def _verdict(report: DiffReport) -> str:
    if report.ok:
        return "✅ no unapproved widening"
    parts = []
    if report.unapproved_widenings:
        parts.append(f"{report.unapproved_widenings} unapproved widening decision(s)")
    if report.approvals_needing_review:
        parts.append(f"{len(report.approvals_needing_review)} change(s) to approvals.yaml need review")
    return "❌ " + "; ".join(parts)


def _spread(values: set[str], limit: int = 6) -> str:
    ordered = sorted(values)
    shown = ", ".join(ordered[:limit])
    return shown + (f" +{len(ordered) - limit}" if len(ordered) > limit else "")


def _group_row(g: Group) -> str:
    if g.classification == "changed":
        cells = (f"{_ICON[g.classification]} changed", _spread(g.roles), _spread({f"`{t}`" for t in g.tools}),
                 _spread(g.purposes), f"`{g.reason}`", str(g.count), ", ".join(sorted(g.kinds)), "")  # fmt: skip
    else:
        cells = (f"{_ICON[g.classification]} {g.classification}", g.role, f"`{g.tool}`", g.purpose,
                 f"`{g.reason}`", str(g.count), ", ".join(sorted(g.kinds)), _status(g))  # fmt: skip
    return "| " + " | ".join(_md_cell(x) for x in cells) + " |"


def to_markdown(report: DiffReport, *, max_chars: int | None = None) -> str:
    """A PR comment: verdict, counts, a table of groups, and examples under a fold.

    With `max_chars` it is a summary that never exceeds that many characters: the verdict, the
    counts, any approvals change and then the groups in order (unapproved widenings first) while they
    fit, examples last; what is left out is counted and left to the full report (`max_chars=None`,
    the JSON or the HTML page).
    """
    sources = ", ".join(f"{n} {s}" for s, n in sorted(report.by_source.items()))
    rate = report.evaluated / report.seconds if report.seconds > 0 else 0.0
    head = [
        f"## Policy diff `{report.base_label}` → `{report.head_label}`",
        "",
        f"**{_verdict(report)}** — {report.evaluated} inputs replayed ({sources}) in {report.seconds:.1f}s"
        + (f" ({rate:,.0f} inputs/s)." if rate else "."),
        "",
        "| class | decisions |",
        "|---|---:|",
        *(f"| {_ICON[k]} {k} | {report.count(k)} |" for k in ("widening", "narrowing", "changed")),
        "",
    ]
    if report.approvals_source:
        head += [f"Approvals read from `{report.approvals_source}` (never from the change under review).", ""]
    if report.approvals_changes:
        head += ["### approvals.yaml changed", "",
                 "A change to the approvals is itself a widening: it needs review by the approvals' owners "
                 "and approves nothing in this diff.", ""]  # fmt: skip
        for c in report.approvals_changes:
            flag = "needs review" if c.needs_review else "narrows (no review needed)"
            head.append(f"- `{c.id}` {c.kind}: {_md_cell(c.detail) or '-'} — **{flag}**")
        head.append("")
    if report.expired_approvals:
        head += [f"⚠️ expired approvals (they approve nothing): {', '.join(report.expired_approvals)}", ""]
    if not report.groups:
        head.append("No decision changed.")
        return "\n".join(head) + "\n"
    head += [
        "| class | role | tool | purpose | reason | count | kinds | approval |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    legend = ["", REASON_LEGEND, "", CHANGED_LEGEND, ""]
    budget = None if max_chars is None else max_chars - 600  # room for the closing notes
    used = sum(len(line) + 1 for line in head + legend)
    rows: list[str] = []
    for g in report.groups:
        row = _group_row(g)
        if budget is not None and used + len(row) + 1 > budget:
            break
        rows.append(row)
        used += len(row) + 1
    left_out = len(report.groups) - len(rows)
    lines = head + rows
    if left_out:
        unapproved_out = sum(g.unapproved for g in report.groups[len(rows) :])
        lines.append("")
        lines.append(
            f"… {left_out} more group(s) ({sum(g.count for g in report.groups[len(rows) :])} decisions"
            + (f", {unapproved_out} of them unapproved widenings" if unapproved_out else "")
            + ") are in the full report (the `policy-report` artifact: markdown, JSON and HTML)."
        )
    lines += legend
    examples = ["<details><summary>Examples</summary>", ""]
    used += 80
    shown = 0
    for g in report.groups[: len(rows)]:
        block = [f"**{g.classification} · {g.role} · `{g.tool}` · {g.purpose} · `{g.reason}`**"]
        block += [f"- {_md_cell(_example(c))}" for c in g.examples]
        block.append("")
        size = sum(len(line) + 1 for line in block)
        if budget is not None and used + size > budget:
            break
        examples += block
        used += size
        shown += 1
    if shown:
        if shown < len(rows):
            examples.append(f"Examples of {len(rows) - shown} more group(s) are in the full report.")
        lines += [*examples, "</details>"]
    return "\n".join(lines) + "\n"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px} .sub{color:#59636e;margin-bottom:16px}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600;margin:12px 0}
.ok{background:#dafbe1;border:1px solid #4ac26b} .bad{background:#ffebe9;border:1px solid #ff8182}
.cards{display:flex;gap:12px;margin:12px 0 20px}
.card{border:1px solid #d1d9e0;border-radius:6px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:24px} table{border-collapse:collapse;width:100%;margin-bottom:20px}
table{table-layout:fixed} th,td{border:1px solid #d1d9e0;padding:5px 7px;text-align:left;vertical-align:top;
overflow-wrap:anywhere} th{background:#f6f8fa}
tr.widening td:first-child{border-left:4px solid #cf222e} tr.narrowing td:first-child{border-left:4px solid #1a7f37}
tr.changed td:first-child{border-left:4px solid #9a6700}
code{font:12px ui-monospace,monospace;background:#f6f8fa;padding:1px 4px;border-radius:4px}
.unapproved{color:#cf222e;font-weight:600} .approved{color:#1a7f37}
ul{margin:4px 0;padding-left:18px} li{font-size:12px}
details summary{cursor:pointer;color:#0969da}
"""


def to_html(report: DiffReport) -> str:
    """One self-contained page: verdict, counts, and a table of groups with their examples."""
    e = html.escape
    cls = "ok" if report.ok else "bad"
    verdict = _verdict(report).removeprefix("✅ ").removeprefix("❌ ")
    if not report.ok:
        verdict += ": this change needs review"
    cards = "".join(
        f'<div class="card">{e(k)}<b>{report.count(k)}</b></div>'
        for k in ("widening", "narrowing", "changed")
    )
    sources = ", ".join(f"{n} {e(s)}" for s, n in sorted(report.by_source.items()))
    rows = []
    for g in report.groups:
        status = _status(g)
        status_cls = "unapproved" if g.unapproved else "approved"
        reason = g.reason.replace(",", ", ")
        role, tool, purpose = g.role, g.tool, g.purpose
        if g.classification == "changed":
            role, tool, purpose = _spread(g.roles), _spread(g.tools), _spread(g.purposes)
        examples = "".join(f"<li>{e(_example(c))}</li>" for c in g.examples)
        rows.append(
            f'<tr class="{e(g.classification)}"><td>{e(g.classification)}</td><td>{e(role)}</td>'
            f"<td><code>{e(tool)}</code></td><td>{e(purpose)}</td><td><code>{e(reason)}</code></td>"
            f"<td>{g.count}</td><td>{e(', '.join(sorted(g.kinds)))}</td>"
            f'<td class="{status_cls}">{e(status)}</td>'
            f"<td><details><summary>{len(g.examples)} example(s)</summary><ul>{examples}</ul></details></td></tr>"
        )
    table = (
        "<table><colgroup><col style='width:7%'><col style='width:7%'><col style='width:15%'>"
        "<col style='width:11%'><col style='width:15%'><col style='width:5%'><col style='width:12%'>"
        "<col style='width:13%'><col style='width:15%'></colgroup>"
        "<thead><tr><th>class</th><th>role</th><th>tool</th><th>purpose</th><th>reason</th>"
        "<th>count</th><th>kinds</th><th>approval</th><th>examples</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        if rows
        else "<p>No decision changed.</p>"
    )
    expired = (
        f"<p class='unapproved'>Expired approvals (approve nothing): {e(', '.join(report.expired_approvals))}</p>"
        if report.expired_approvals
        else ""
    )
    if report.approvals_changes:
        items = "".join(
            f"<li><code>{e(c.id)}</code> {e(c.kind)}: {e(c.detail or '-')} — "
            f"<span class='{'unapproved' if c.needs_review else 'approved'}'>"
            f"{'needs review' if c.needs_review else 'narrows'}</span></li>"
            for c in report.approvals_changes
        )
        expired += (
            "<h2>approvals.yaml changed</h2><p>A change to the approvals is itself a widening: it needs "
            f"review and approves nothing in this diff.</p><ul>{items}</ul>"
        )
    if report.approvals_source:
        expired += f"<p class='sub'>Approvals read from <code>{e(report.approvals_source)}</code>.</p>"
    legend = (
        f"<p class='sub'>{e(REASON_LEGEND.replace('**', '').replace('`', ''))}</p>"
        f"<p class='sub'>{e(CHANGED_LEGEND.replace('**', '').replace('`', ''))}</p>"
        if rows
        else ""
    )
    data = html.escape(json.dumps(to_json(report)["counts"]))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Policy diff {e(report.base_label)} → {e(report.head_label)}</title><style>{_CSS}</style></head>"
        f"<body data-counts='{data}'><h1>Policy diff <code>{e(report.base_label)}</code> → "
        f"<code>{e(report.head_label)}</code></h1>"
        f"<div class='sub'>{report.evaluated} inputs replayed ({sources}) in {report.seconds:.1f}s</div>"
        f"<div class='verdict {cls}'>{e(verdict)}</div><div class='cards'>{cards}</div>{expired}{table}{legend}"
        "</body></html>\n"
    )
