"""`mcp-fhir policy ...` through the real CLI entry point and the real OPA: outputs and exit codes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mcp_fhir.cli.main import main
from tests.governance.minipolicy import (
    APPROVAL,
    commit,
    git,
    new_repo,
    research_reads_observations,
    write_policies,
)

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
NURSE_READ = "  read: [Observation, Patient]"
NURSE_READ_WIDER = "  read: [MedicationStatement, Observation, Patient]"


def copy_policies(tmp: Path, name: str = "policies") -> Path:
    copy = tmp / name
    shutil.copytree(POLICIES, copy)
    return copy


def widen(policies: Path) -> Path:
    roles = policies / "mcp_fhir" / "config" / "roles" / "data.yaml"
    text = roles.read_text(encoding="utf-8")
    if NURSE_READ not in text:
        pytest.fail("the nurse role's read list changed shape; update this test's edit")
    roles.write_text(text.replace(NURSE_READ, NURSE_READ_WIDER), encoding="utf-8")
    return policies


def diff(base: Path | str, head: Path | str, *extra: str) -> int:
    return main(["policy", "diff", str(base), str(head), "--no-grid", "--quiet", *extra])


def test_policy_test_passes_on_the_shipped_policies_and_prints_coverage(capsys, opa_binary):
    assert main(["policy", "test", "--policies", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tests: \d+ passed, 0 failed", out)
    assert "coverage:" in out


def test_policy_test_fails_on_a_failing_rego_test(tmp_path, capsys, opa_binary):
    policies = copy_policies(tmp_path)
    (policies / "mcp_fhir" / "authz" / "broken_test.rego").write_text(
        "package mcp_fhir.authz.broken_test\n\ntest_always_fails if {\n\tfalse\n}\n", encoding="utf-8"
    )
    assert main(["policy", "test", "--policies", str(policies)]) == 1
    assert "test_always_fails" in capsys.readouterr().out


def test_policy_test_names_the_failing_fixture_and_what_differs(tmp_path, capsys, opa_binary):
    policies = copy_policies(tmp_path)
    corpus = policies / "fixtures" / "decisions.json"
    cases = json.loads(corpus.read_text(encoding="utf-8"))
    index = next(i for i, c in enumerate(cases) if c["expect"]["allow"] is True)
    cases[index]["expect"]["allow"] = False
    corpus.write_text(json.dumps(cases), encoding="utf-8")
    assert main(["policy", "test", "--policies", str(policies), "--json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["fixtures_failed"] == [
        f'fixtures/decisions.json[{index}] "{cases[index]["note"]}": allow expected false, got true'
    ]
    assert main(["policy", "test", "--policies", str(policies)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL fixture fixtures/decisions.json[{index}]" in out
    assert "coverage: not measured" in out


def test_policy_test_fails_below_the_coverage_threshold(tmp_path, opa_binary):
    assert main(["policy", "test", "--policies", str(POLICIES), "--threshold", "100"]) == 1


def test_policy_lint_fails_on_unformatted_rego(tmp_path, capsys, opa_binary):
    policies = copy_policies(tmp_path)
    assert main(["policy", "lint", "--policies", str(policies)]) == 0
    (policies / "mcp_fhir" / "authz" / "ugly.rego").write_text(
        "package mcp_fhir.authz.ugly\nx:=1\n", encoding="utf-8"
    )
    assert main(["policy", "lint", "--policies", str(policies)]) == 1
    assert "ugly.rego" in capsys.readouterr().out


def test_policy_eval_from_flags_shows_the_deny_rule_that_fired(capsys, opa_binary):
    code = main(["policy", "eval", "--policies", str(POLICIES), "--role", "nurse", "--tool",
                 "search_medication_statements", "--purpose", "treatment", "--patient", "pat-au-001", "--scope",
                 "user/MedicationStatement.rs", "--time", "2026-11-23T01:00:00Z"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("decision: DENY")
    assert "reason ROLE_NOT_PERMITTED" in out
    assert re.search(r"policies/mcp_fhir/authz/rbac\.rego:\d+ deny", out)


def test_policy_eval_of_an_inline_input_as_json(capsys, opa_binary):
    case = json.loads((POLICIES / "fixtures" / "decisions.json").read_text())[0]
    assert main(["policy", "eval", "--policies", str(POLICIES), "--input-json", json.dumps(case["input"]),
                 "--json"]) == 0  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert shown["decision"]["allow"] is case["expect"]["allow"]
    assert any(f["rule"] == "allow" for f in shown["fired"])


def test_policy_eval_rejects_an_unknown_tool(capsys):
    assert main(["policy", "eval", "--policies", str(POLICIES), "--tool", "drop_tables"]) == 2
    assert "config_invalid" in capsys.readouterr().err


def test_an_unapproved_widening_fails_the_diff_and_the_report_names_it(tmp_path, opa_binary):
    head = widen(copy_policies(tmp_path))
    out, html = tmp_path / "report.md", tmp_path / "report.html"
    assert diff(POLICIES, head, "--out", str(out), "--html", str(html)) == 1
    text = out.read_text()
    assert "unapproved widening" in text
    assert "| nurse | `search_medication_statements` | treatment | `ROLE_NOT_PERMITTED` |" in text
    page = html.read_text()
    assert page.startswith("<!doctype html>")
    assert not re.search(r"(src|href)=|<script|<link|@import|url\(", page), (
        "the HTML page must be self-contained"
    )


def test_a_narrowing_passes_unless_narrowings_are_configured_to_fail(tmp_path, opa_binary):
    base = widen(copy_policies(tmp_path))
    out = tmp_path / "report.json"
    assert diff(base, POLICIES, "--format", "json", "--out", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["narrowing"] >= 1 and report["counts"]["widening"] == 0
    assert diff(base, POLICIES, "--fail-on-narrowing") == 1


def test_an_approval_in_the_bases_approvals_file_lets_the_widening_pass(tmp_path, opa_binary):
    repo = new_repo(tmp_path / "repo", approvals=[APPROVAL])
    git(repo, "checkout", "-q", "-b", "pr")
    write_policies(repo / "policies", research_reads_observations(), approvals=[APPROVAL])
    commit(repo, "research reads observations")
    out = tmp_path / "report.md"
    assert main(["policy", "diff", "main", "pr", "--repo", str(repo), "--quiet", "--out", str(out)]) == 0
    text = out.read_text()
    assert "APR-9 (privacy.officer@example.org, SEC-9)" in text
    assert "Approvals read from `main: approvals.yaml`" in text


def test_a_pull_request_that_widens_and_approves_itself_is_still_flagged(tmp_path, opa_binary):
    repo = new_repo(tmp_path / "repo")
    git(repo, "checkout", "-q", "-b", "pr")
    write_policies(repo / "policies", research_reads_observations(), approvals=[APPROVAL])
    commit(repo, "research reads observations, approved by the same change")
    out = tmp_path / "report.json"
    code = main(["policy", "diff", "main", "pr", "--repo", str(repo), "--quiet", "--format", "json",
                 "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert code == 1
    assert report["unapproved_widenings"] > 0  # the PR's own APR-9 approves nothing
    assert report["approvals_changes"] == [
        {"kind": "added", "id": "APR-9", "detail": "*/search_observations/research/deny_to_allow by "
         "privacy.officer@example.org", "needs_review": True}
    ]  # fmt: skip


def test_a_change_to_the_approvals_alone_fails_the_diff(tmp_path, opa_binary):
    repo = new_repo(tmp_path / "repo")
    git(repo, "checkout", "-q", "-b", "pr")
    write_policies(repo / "policies", approvals=[APPROVAL])
    commit(repo, "approve APR-9")
    out = tmp_path / "report.md"
    assert main(["policy", "diff", "main", "pr", "--repo", str(repo), "--quiet", "--out", str(out)]) == 1
    text = out.read_text()
    assert "1 change(s) to approvals.yaml need review" in text and "No decision changed." in text


def test_uncommitted_policy_edits_are_refused_for_head_and_included_by_worktree(tmp_path, capsys, opa_binary):
    repo = new_repo(tmp_path / "repo")
    write_policies(repo / "policies", research_reads_observations())  # edited, not committed
    assert main(["policy", "diff", "main", "HEAD", "--repo", str(repo), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config_invalid" in err and "policy.diff.head" in err and "WORKTREE" in err
    out = tmp_path / "report.json"
    assert main(["policy", "diff", "main", "WORKTREE", "--repo", str(repo), "--quiet", "--format", "json",
                 "--out", str(out)]) == 1  # fmt: skip
    assert json.loads(out.read_text())["counts"]["widening"] > 0
    # a committed HEAD with a clean tree is diffed as before
    commit(repo, "research reads observations")
    assert main(["policy", "diff", "HEAD~1", "HEAD", "--repo", str(repo), "--quiet"]) == 1


def test_the_summary_fits_a_pull_request_comment_and_the_full_report_keeps_every_group(tmp_path, opa_binary):
    head = copy_policies(tmp_path)
    defaults = head / "mcp_fhir" / "config" / "defaults" / "data.yaml"
    text = defaults.read_text(encoding="utf-8")
    assert "max_results: 100 " in text, "the defaults' max_results line changed shape; update this test"
    defaults.write_text(text.replace("max_results: 100 ", "max_results: 1000 "), encoding="utf-8")
    widen(head)
    summary, full, js = tmp_path / "summary.md", tmp_path / "full.md", tmp_path / "full.json"
    assert main(["policy", "diff", str(POLICIES), str(head), "--quiet", "--out", str(summary), "--max-chars",
                 "4000", "--full-md", str(full), "--json-out", str(js)]) == 1  # fmt: skip
    short, long = summary.read_text(), full.read_text()
    assert len(short) <= 4_000 < len(long)
    assert "unapproved widening" in short and "more group(s)" in short and "`policy-report` artifact" in short
    report = json.loads(js.read_text())
    assert len(report["groups"]) > short.count("\n| ")
    assert main(["policy", "diff", str(POLICIES), str(head), "--quiet", "--max-chars", "70000"]) == 2


def test_diff_accepts_git_refs(tmp_path, capsys, opa_binary):
    repo = new_repo(tmp_path / "repo")  # not this checkout: its policies/ may hold uncommitted edits
    assert main(["policy", "diff", "main", "HEAD", "--repo", str(repo), "--quiet"]) == 0
    assert "No decision changed." in capsys.readouterr().out


def test_diff_of_an_unknown_ref_is_a_usage_error(capsys):
    assert main(["policy", "diff", "no-such-ref-xyz", str(POLICIES), "--repo", str(REPO), "--quiet"]) == 2
    assert "config_invalid" in capsys.readouterr().err


def test_bundle_and_opa_config_from_the_command_line(tmp_path, capsys, opa_binary):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv, pub = tmp_path / "priv.pem", tmp_path / "pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    out = tmp_path / "bundle.tar.gz"
    assert main(["policy", "bundle", "--policies", str(POLICIES), "--signing-key", str(priv),
                 "--verification-key", str(pub), "-o", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert re.search(r"revision [0-9a-f]{7,}(-dirty)?", printed)
    assert "signature verified" in printed
    assert main(["policy", "opa-config", "--verification-key", str(pub), "--service-url",
                 "https://bundles.example.org"]) == 0  # fmt: skip
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["bundles"]["authz"]["signing"]["keyid"] in cfg["keys"]
