"""`allow` and `_deny` skip the deny sets that a fact already rules out (issue #20): the tools, rbac,
purpose and scopes deny rules are never read when the call is granted (`tools.matches`, a granting
role, `purpose.permitted`, `scopes.covered`), and the patient, sensitivity and consent packages'
`ok` rules answer the common case without evaluating their deny rules. A deny rule added to one of
these packages must be checked against that shortcut, or a decision could skip it: this test pins
each package's deny rules (by reason code, and by count, so a rule without METADATA is caught too)
and fails until the list here is updated.

What to do when it fails: read what rules the package out. For tools, rbac, purpose and scopes the
new rule must be unable to fire when the grant holds, or it belongs in `authz.deny` (read in full).
For patient, sensitivity and consent, the first branch of the package's `ok` must be false for
every input the new rule can deny (the `else` branch evaluates the whole deny set). Then add the
code here and an input that reaches the rule to `testing.ok_inputs` (`authz_test.rego` compares
each `ok` with its deny set, and `_deny` with the union of every deny set, on all of them).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.sidecar import POLICIES

AUTHZ = POLICIES / "mcp_fhir" / "authz"
SHORTCUT_DENY_CODES = {
    "consent.rego": {"CONSENT_DENIED", "CONSENT_UNAVAILABLE"},
    "patient.rego": {"PATIENT_FILTER_NOT_PERMITTED", "PATIENT_MISMATCH", "PATIENT_REQUIRED"},
    "purpose.rego": {"PURPOSE_MISMATCH", "PURPOSE_NOT_PERMITTED", "PURPOSE_REQUIRED", "PURPOSE_UNKNOWN"},
    "rbac.rego": {"NO_ROLE", "ROLE_NOT_PERMITTED", "ROLE_PURPOSE_NOT_PERMITTED"},
    "scopes.rego": {"SCOPE_NOT_GRANTED"},
    "sensitivity.rego": {"BREAK_GLASS_NOT_PERMITTED", "BREAK_GLASS_REASON_REQUIRED"},
    "tools.rego": {"TOOL_OPERATION_MISMATCH", "TOOL_RESOURCE_TYPE_MISMATCH", "UNKNOWN_TOOL"},
}


def _opa_json(opa: str, *args: str) -> Any:
    return json.loads(subprocess.run([opa, *args], capture_output=True, check=True, timeout=60).stdout)


def _deny_rules(opa: str, path: Path) -> tuple[int, set[str]]:
    parsed = _opa_json(opa, "parse", "--format", "json", str(path))
    count = sum(1 for r in parsed["rules"] if [t.get("value") for t in r["head"].get("ref", [])] == ["deny"])
    inspected = _opa_json(opa, "inspect", "--annotations", "--format", "json", str(path))
    codes = {
        a["annotations"]["custom"]["code"]
        for a in inspected.get("annotations") or []
        if a["path"][-1]["value"] == "deny"
    }
    return count, codes


@pytest.mark.parametrize("name", sorted(SHORTCUT_DENY_CODES))
def test_a_package_whose_deny_set_is_skipped_has_exactly_the_deny_rules_its_shortcut_was_checked_against(
    name: str, opa_binary: str
):
    count, codes = _deny_rules(opa_binary, AUTHZ / name)
    assert codes == SHORTCUT_DENY_CODES[name]
    assert count == len(SHORTCUT_DENY_CODES[name])


def test_the_pin_catches_a_deny_rule_added_to_a_shortcut_package(tmp_path: Path, opa_binary: str):
    source = (AUTHZ / "consent.rego").read_text(encoding="utf-8")
    extra = '\n# METADATA\n# title: New\n# custom:\n#   code: CONSENT_NEW\ndeny contains "x" if input.y\n'
    (tmp_path / "consent.rego").write_text(source + extra, encoding="utf-8")
    count, codes = _deny_rules(opa_binary, tmp_path / "consent.rego")
    assert "CONSENT_NEW" in codes
    assert count == 3
