"""The grid sees every input the policy reads, and approvals cannot come from the change under review.

The real-OPA tests use the small policy of `tests/governance/minipolicy.py`, whose research purpose is
granted by a `research_consent` claim: a widening that only a grid varying that claim can see.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mcp_fhir.governance.diff import Approvals, BatchEvaluator, Case, approvals_changes, diff_cases
from mcp_fhir.governance.grid import GRID_OTHER_PATIENT, GRID_PATIENT, grid_cases
from mcp_fhir.governance.report import to_markdown
from tests.governance.minipolicy import APPROVAL, CONFIG, research_reads_observations, write_policies


def claims_of(cases, key):
    return {repr(c.input["subject"]["claims"].get(key)) for c in cases}


def test_the_grid_varies_every_claim_the_policy_data_names():
    cases = grid_cases([CONFIG])
    assert claims_of(cases, "research_consent") == {"None", "True", "False"}
    assert claims_of(cases, "patient") == {"None", repr(GRID_PATIENT), repr(GRID_OTHER_PATIENT)}
    assert {c.input["context"]["purpose"] for c in cases} == {"treatment", "research", None}
    assert {c.input["context"]["break_glass"] is None for c in cases} == {True, False}


def test_a_claim_named_only_by_the_head_is_varied_on_both_sides():
    base = {**CONFIG, "claims": {k: v for k, v in CONFIG["claims"].items() if k != "research_consent"}}
    assert claims_of(grid_cases([base]), "research_consent") == {"None"}
    assert claims_of(grid_cases([CONFIG, base]), "research_consent") == {"None", "True", "False"}


def test_the_bound_purpose_claim_takes_every_purpose():
    cfg = {**CONFIG, "claims": {**CONFIG["claims"], "purpose": "purpose_of_use"}}
    assert claims_of(grid_cases([cfg]), "purpose_of_use") == {"None", "'treatment'", "'research'"}


def test_every_category_label_a_purpose_names_is_requested():
    cfg = yaml.safe_load(yaml.safe_dump(CONFIG))
    cfg["purposes"]["treatment"]["resource_types"]["Observation"] = {
        "categories": ["laboratory", "vital-signs"]
    }
    categories = {
        c.input["resource"]["params"].get("category")
        for c in grid_cases([cfg])
        if c.input["action"]["resource_type"] == "Observation"
    }
    assert categories == {None, "laboratory", "vital-signs"}


def test_the_full_grid_crosses_the_dimensions_and_the_default_varies_them_one_at_a_time():
    default, full = grid_cases([CONFIG]), grid_cases([CONFIG], full=True)
    crossed = [
        c for c in full
        if c.input["subject"]["claims"].get("research_consent") is True
        and c.input["subject"]["claims"].get("patient") == GRID_PATIENT
    ]  # fmt: skip
    assert crossed and len(full) > len(default)
    assert not any(
        c.input["subject"]["claims"].get("research_consent") is not None
        and "patient" in c.input["subject"]["claims"]
        for c in default
    )


def test_a_claim_gated_widening_is_flagged(tmp_path, opa_binary):
    base = BatchEvaluator(write_policies(tmp_path / "base"))
    head = BatchEvaluator(write_policies(tmp_path / "head", research_reads_observations()))
    cases = grid_cases([head.query("data.mcp_fhir.config"), base.query("data.mcp_fhir.config")])
    report = diff_cases(cases, base, head, base_label="base", head_label="head")
    widenings = [c for c in report.changes if c.classification == "widening"]
    assert widenings and not report.ok
    assert report.unapproved_widenings == len(widenings)
    for change in widenings:
        assert change.case.input["subject"]["claims"]["research_consent"] is True
        assert (change.tool, change.purpose, change.kinds) == (
            "search_observations",
            "research",
            ("deny_to_allow",),
        )
    # without the claim dimension the change is invisible: no input lacking the claim widens
    without_claim = [c for c in cases if "research_consent" not in c.input["subject"]["claims"]]
    assert diff_cases(without_claim, base, head, base_label="b", head_label="h").ok


def approvals_file(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"approvals": entries}), encoding="utf-8")
    return path


def test_an_added_or_edited_approval_needs_review_and_a_removed_one_does_not(tmp_path):
    base = approvals_file(tmp_path / "base.yaml", [APPROVAL])
    same = approvals_file(tmp_path / "same.yaml", [dict(APPROVAL)])
    assert approvals_changes(base, same) == []
    added = approvals_file(tmp_path / "added.yaml", [APPROVAL, {**APPROVAL, "id": "APR-10"}])
    assert [(c.kind, c.id, c.needs_review) for c in approvals_changes(base, added)] == [
        ("added", "APR-10", True)
    ]
    edited = approvals_file(tmp_path / "edited.yaml", [{**APPROVAL, "role": "nurse"}])
    [change] = approvals_changes(base, edited)
    assert (change.kind, change.needs_review) == ("modified", True) and "role" in change.detail
    removed = approvals_file(tmp_path / "removed.yaml", [])
    assert [(c.kind, c.needs_review) for c in approvals_changes(base, removed)] == [("removed", False)]


def test_a_head_approvals_file_that_does_not_parse_needs_review(tmp_path):
    base = approvals_file(tmp_path / "base.yaml", [])
    broken = tmp_path / "broken.yaml"
    broken.write_text("approvals: [unclosed", encoding="utf-8")
    [change] = approvals_changes(base, broken)
    assert (change.kind, change.needs_review) == ("invalid", True)
    assert approvals_changes(base, tmp_path / "missing.yaml") == []  # no file = no approvals = nothing added


def test_an_approvals_change_fails_the_report_even_when_the_widening_is_covered(tmp_path, opa_binary):
    base = BatchEvaluator(write_policies(tmp_path / "base"))
    head = BatchEvaluator(
        write_policies(tmp_path / "head", research_reads_observations(), approvals=[APPROVAL])
    )
    cases = grid_cases([head.query("data.mcp_fhir.config")])
    changes = approvals_changes(tmp_path / "base" / "approvals.yaml", tmp_path / "head" / "approvals.yaml")
    # the head's own approval would cover the widening, but it is an approvals change: still not ok
    report = diff_cases(cases, base, head, base_label="b", head_label="h",
                        approvals=Approvals.load(tmp_path / "head" / "approvals.yaml"),
                        approvals_changes=changes)  # fmt: skip
    assert report.unapproved_widenings == 0
    assert not report.ok
    text = to_markdown(report, max_chars=60_000)
    assert "approvals.yaml changed" in text and "`APR-9` added" in text


class Stub:
    """A stand-in for BatchEvaluator that decides by a function (unit tests of grouping only)."""

    def __init__(self, decide):
        self.decide, self.workers, self.chunk_size = decide, 1, 7

    def chunks(self, inputs):
        return [inputs[i : i + self.chunk_size] for i in range(0, len(inputs), self.chunk_size)]

    def decide_chunk(self, inputs):
        return [self.decide(x) for x in inputs]


def deny(*codes):
    return {"allow": False, "reasons": [{"code": c} for c in codes], "obligations": {}, "audit": {}}


def test_a_new_reason_code_on_many_denies_is_one_changed_row_that_lists_its_spread():
    cases = [
        Case("grid", f"{role} {tool} {purpose}", {
            "subject": {"claims": {"roles": [role]}}, "action": {"tool": tool}, "context": {"purpose": purpose},
        })
        for role in ("nurse", "clinician", "admin", "auditor")
        for tool in ("read_patient", "search_observations", "refresh")
        for purpose in ("treatment", "audit", None)
    ]  # fmt: skip
    base, head = (
        Stub(lambda _: deny("ROLE_NOT_PERMITTED")),
        Stub(lambda _: deny("NEW_RULE", "ROLE_NOT_PERMITTED")),
    )
    report = diff_cases(cases, base, head, base_label="b", head_label="h")
    assert report.count("changed") == len(cases) == 36
    [group] = report.groups
    assert (group.role, group.tool, group.purpose) == ("*", "*", "*")
    assert group.reason == "ROLE_NOT_PERMITTED → NEW_RULE,ROLE_NOT_PERMITTED"
    assert group.roles == {"nurse", "clinician", "admin", "auditor"} and len(group.tools) == 3
    assert report.ok
    text = to_markdown(report, max_chars=60_000)
    rows = [line for line in text.splitlines() if line.startswith("| ✳️ changed |") and "→" in line]
    assert len(rows) == 1 and "**reason**:" in text


def trail_of(path, bodies):
    """A JSON-lines trail of these entry bodies, chained as the audit trail writes them."""
    from mcp_fhir.audit.chain import ChainHead, canonical_json, seal

    head = ChainHead()
    path.write_bytes(b"".join(canonical_json(seal(head, body)) + b"\n" for body in bodies))
    return path


def test_a_trail_replays_the_input_of_every_access_record_plain_or_encrypted(tmp_path):
    import os

    from mcp_fhir.audit.chain import GENESIS, entry_hash
    from mcp_fhir.audit.crypto import RecordCipher
    from mcp_fhir.governance.grid import replay_cases

    inputs = [{"action": {"tool": "read_patient"}, "context": {"request_id": f"r{i}"}} for i in range(3)]
    bodies = [
        {"record": {"kind": "access", "decision_input": inputs[0], "tool": "read_patient"}},
        {"record": {"kind": "alert", "decision_input": inputs[1]}},
        {"checkpoint": {"sig": "x"}},
        {"record": {"decision_input": inputs[2]}},  # no kind: an access record
    ]
    plain = replay_cases(trail_of(tmp_path / "plain.jsonl", bodies))
    assert [(c.label, c.input) for c in plain] == [
        ("plain.jsonl#seq1", inputs[0]),
        ("plain.jsonl#seq4", inputs[2]),
    ]

    cipher = RecordCipher(os.urandom(32), None)
    lines, prev = [], GENESIS
    for seq, body in enumerate(bodies, start=1):
        entry = {"seq": seq, "prev": prev, **(cipher.encrypt(body["record"], seq=seq, prev=prev)
                                              if "record" in body else body)}  # fmt: skip
        entry["hash"] = prev = entry_hash(entry)
        lines.append(json.dumps(entry))
    encrypted = tmp_path / "encrypted.jsonl"
    encrypted.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [c.input for c in replay_cases(encrypted, cipher)] == [inputs[0], inputs[2]]
    assert replay_cases(encrypted) == []  # no key, no records
