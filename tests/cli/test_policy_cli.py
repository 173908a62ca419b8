"""`mcp-fhir policy ...` through the real CLI entry point and the real OPA: outputs and exit codes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mcp_fhir.cli.main import main

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


def test_an_approval_in_the_heads_approvals_file_lets_the_widening_pass(tmp_path, opa_binary):
    head = widen(copy_policies(tmp_path))
    (head / "approvals.yaml").write_text(yaml.safe_dump({"approvals": [{
        "id": "APR-7", "role": "nurse", "tool": "search_medication_statements", "purpose": "treatment",
        "kind": "deny_to_allow", "reviewer": "privacy.officer@example.org", "ticket": "SEC-7",
    }]}), encoding="utf-8")  # fmt: skip
    out = tmp_path / "report.md"
    assert diff(POLICIES, head, "--out", str(out)) == 0
    assert "APR-7 (privacy.officer@example.org, SEC-7)" in out.read_text()


def test_diff_accepts_git_refs(tmp_path, capsys, opa_binary):
    assert main(["policy", "diff", "HEAD", "HEAD", "--repo", str(REPO), "--no-grid", "--quiet"]) == 0
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
