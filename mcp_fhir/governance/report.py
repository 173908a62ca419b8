"""Render a `DiffReport`: markdown for a pull request, JSON for machines, one self-contained HTML page.

Every renderer shows the same facts: counts per class, then one row per group (class, role, tool,
purpose, reason code) with its count, the kinds of change, whether it is approved, and a few
examples. The HTML page has no external assets (inline CSS, no scripts, no fonts, no images).
"""

from __future__ import annotations

import html
import json
from typing import Any

from mcp_fhir.governance.diff import Change, DiffReport, Group

__all__ = ["MAX_MD_GROUPS", "to_html", "to_json", "to_markdown"]

MAX_MD_GROUPS = 200  # a PR comment stays readable; the JSON and HTML keep every group
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
                "examples": [_change_dict(c) for c in g.examples],
            }
            for g in report.groups
        ],
    }


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: DiffReport) -> str:
    """A PR comment: verdict, counts, a table of groups, and examples under a fold."""
    verdict = (
        "✅ no unapproved widening"
        if report.ok
        else f"❌ {report.unapproved_widenings} unapproved widening decision(s)"
    )
    sources = ", ".join(f"{n} {s}" for s, n in sorted(report.by_source.items()))
    lines = [
        f"## Policy diff `{report.base_label}` → `{report.head_label}`",
        "",
        f"**{verdict}** — {report.evaluated} inputs replayed ({sources}) in {report.seconds:.1f}s.",
        "",
        "| class | decisions |",
        "|---|---:|",
        *(f"| {_ICON[k]} {k} | {report.count(k)} |" for k in ("widening", "narrowing", "changed")),
        "",
    ]
    if report.expired_approvals:
        lines += [f"⚠️ expired approvals (they approve nothing): {', '.join(report.expired_approvals)}", ""]
    if not report.groups:
        lines.append("No decision changed.")
        return "\n".join(lines) + "\n"
    lines += [
        "| class | role | tool | purpose | reason | count | kinds | approval |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    for g in report.groups[:MAX_MD_GROUPS]:
        lines.append(
            "| "
            + " | ".join(
                _md_cell(x)
                for x in (
                    f"{_ICON[g.classification]} {g.classification}",
                    g.role,
                    f"`{g.tool}`",
                    g.purpose,
                    f"`{g.reason}`",
                    str(g.count),
                    ", ".join(sorted(g.kinds)),
                    _status(g),
                )
            )
            + " |"
        )
    if len(report.groups) > MAX_MD_GROUPS:
        lines.append(f"\n… {len(report.groups) - MAX_MD_GROUPS} more groups in the JSON/HTML report.")
    lines += ["", "<details><summary>Examples</summary>", ""]
    for g in report.groups[:MAX_MD_GROUPS]:
        lines.append(f"**{g.classification} · {g.role} · `{g.tool}` · {g.purpose} · `{g.reason}`**")
        lines += [f"- {_md_cell(_example(c))}" for c in g.examples]
        lines.append("")
    lines.append("</details>")
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
    verdict = (
        "No unapproved widening"
        if report.ok
        else f"{report.unapproved_widenings} unapproved widening decision(s): this change needs review"
    )
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
        examples = "".join(f"<li>{e(_example(c))}</li>" for c in g.examples)
        rows.append(
            f'<tr class="{e(g.classification)}"><td>{e(g.classification)}</td><td>{e(g.role)}</td>'
            f"<td><code>{e(g.tool)}</code></td><td>{e(g.purpose)}</td><td><code>{e(reason)}</code></td>"
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
    data = html.escape(json.dumps(to_json(report)["counts"]))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Policy diff {e(report.base_label)} → {e(report.head_label)}</title><style>{_CSS}</style></head>"
        f"<body data-counts='{data}'><h1>Policy diff <code>{e(report.base_label)}</code> → "
        f"<code>{e(report.head_label)}</code></h1>"
        f"<div class='sub'>{report.evaluated} inputs replayed ({sources}) in {report.seconds:.1f}s</div>"
        f"<div class='verdict {cls}'>{e(verdict)}</div><div class='cards'>{cards}</div>{expired}{table}"
        "</body></html>\n"
    )
