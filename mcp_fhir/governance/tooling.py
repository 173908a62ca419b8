"""The OPA toolchain behind `mcp-fhir policy test|lint|eval`, as small runners with typed results.

* `run_tests`  — `opa test --format json` (results, with what each failing test printed) and
  `opa test --coverage --format json` (coverage, uncovered lines per file), `--fail-on-empty`, a
  coverage threshold; then every case of `fixtures/*.json` is decided by the real OPA and each one
  that disagrees with its `expect` is named (file, index, note, what differs), because the Rego
  corpus test can only say that *some* fixture failed.
* `run_lint`   — `opa fmt --fail -l`, `opa check --strict`, and Regal when installed.
* `explain`    — `opa eval --explain=full --format json`: the decision plus the rules whose bodies
  succeeded (trace `Exit` events of rule nodes), with file:line. Checked on OPA 1.22.3: the JSON
  output carries an `explanation` array of trace events; REST `?explain=` is documented for GET
  only, so the CLI is used.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp_fhir._exceptions import ConfigError, PolicyUnavailable
from mcp_fhir.governance.diff import DECISION_QUERY, NON_POLICY_FILES
from mcp_fhir.policy.managed_opa import find_opa

__all__ = [
    "DEFAULT_COVERAGE_THRESHOLD",
    "DEFAULT_TOOL_TIMEOUT",
    "FiredRule",
    "LintResult",
    "TestResult",
    "check_fixtures",
    "explain",
    "find_regal",
    "run_lint",
    "run_tests",
]

DEFAULT_COVERAGE_THRESHOLD = 95.0
DEFAULT_TOOL_TIMEOUT = 300.0
_PROJECT_REGAL = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "regal"


def _exec(cmd: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise PolicyUnavailable(f"{Path(cmd[0]).name} {cmd[1]} did not finish in time") from exc


def _ignores() -> list[str]:
    return [arg for name in NON_POLICY_FILES for arg in ("--ignore", name)]


@dataclass
class TestResult:
    """What `opa test` found: pass/fail counts, coverage and the uncovered lines per file."""

    passed: int = 0
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    coverage: float = 0.0
    threshold: float = DEFAULT_COVERAGE_THRESHOLD
    uncovered: dict[str, list[int]] = field(default_factory=dict)
    fixtures_failed: list[str] = field(default_factory=list)
    coverage_note: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.passed > 0
            and not self.failed
            and not self.errors
            and not self.fixtures_failed
            and self.coverage >= self.threshold
        )

    def summary(self) -> str:
        lines = [
            f"tests: {self.passed} passed, {len(self.failed)} failed",
            f"coverage: {self.coverage_note}"
            if self.coverage_note
            else f"coverage: {self.coverage:.2f}% (threshold {self.threshold:g}%)",
        ]
        lines += [f"  FAIL {name}" for name in self.failed]
        lines += [f"  FAIL fixture {name}" for name in self.fixtures_failed]
        lines += [f"  ERROR {e}" for e in self.errors]
        for path, rows in sorted(self.uncovered.items()):
            lines.append(f"  uncovered {path}: lines {', '.join(str(r) for r in rows)}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def run_tests(
    policies: Path,
    *,
    threshold: float = DEFAULT_COVERAGE_THRESHOLD,
    binary: str | None = None,
    timeout: float = DEFAULT_TOOL_TIMEOUT,
) -> TestResult:
    """Run the Rego suite (results and coverage) against the real OPA."""
    if not 0 <= threshold <= 100:
        raise ConfigError("policy.test.threshold", "must be a percentage from 0 to 100")
    if not policies.is_dir():
        raise ConfigError("policy.test.policies", "must be a folder")
    opa = find_opa(binary)
    result = TestResult(threshold=threshold)
    # OPA cuts each test at 5 s by default; a heavy table-driven test passes that on a loaded machine, so
    # each test gets the whole run's bound instead (the run itself is bounded by `timeout`).
    per_test = f"{int(timeout)}s"
    base = [opa, "test", str(policies), "--format", "json", "--fail-on-empty", "--timeout", per_test, *_ignores()]
    proc = _exec(base, timeout)
    try:
        cases = json.loads(proc.stdout) if proc.stdout.strip() else []
    except json.JSONDecodeError:
        cases = []
    if not cases and proc.returncode != 0:
        result.errors.append(" | ".join(proc.stderr.strip().splitlines()[:5]) or "opa test failed")
        return result
    for case in cases:
        name = f"{case.get('package', '')}.{case.get('name', '')}"
        loc = case.get("location") or {}
        if case.get("fail") or case.get("error"):
            printed = _printed(case.get("output"))
            result.failed.append(
                f"{name} ({loc.get('file')}:{loc.get('row')})" + (f" printed: {printed}" if printed else "")
            )
        elif not case.get("skip"):
            result.passed += 1
    result.fixtures_failed = check_fixtures(policies, binary=opa, timeout=timeout)
    cov = _exec([*base, "--coverage"], timeout)
    try:
        report = json.loads(cov.stdout)
    except json.JSONDecodeError:
        if result.failed or result.fixtures_failed:
            # OPA prints the failures instead of a coverage report while any test fails.
            result.coverage_note = "not measured: OPA reports coverage only when every test passes"
        else:
            result.errors.append("opa test --coverage did not answer with JSON")
        return result
    result.coverage = float(report.get("coverage") or 0.0)
    for path, info in (report.get("files") or {}).items():
        rows = sorted({r["start"]["row"] for r in info.get("not_covered") or []})
        if rows:
            result.uncovered[path] = rows
    return result


def _printed(output: Any, limit: int = 400) -> str:
    """What a test printed (`opa test --format json` carries it base64-encoded), on one line."""
    if not isinstance(output, str) or not output:
        return ""
    try:
        text = base64.b64decode(output, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        text = output
    text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fixture_mismatch(decision: Mapping[str, Any] | None, expect: Mapping[str, Any]) -> list[str]:
    """What differs between a decision and a fixture's `expect` (the fields the corpus test compares)."""
    got = decision or {"allow": False, "reasons": [{"code": "opa_undefined"}], "obligations": {}, "audit": {}}
    out = []
    if got.get("allow") != expect.get("allow"):
        out.append(f"allow expected {json.dumps(expect.get('allow'))}, got {json.dumps(got.get('allow'))}")
    codes = sorted(str(r.get("code")) for r in got.get("reasons") or [] if isinstance(r, Mapping))
    if "reasons" in expect and codes != expect.get("reasons"):
        out.append(f"reasons expected {json.dumps(expect.get('reasons'))}, got {json.dumps(codes)}")
    if expect.get("obligations") and got.get("obligations") != expect["obligations"]:
        keys = sorted(
            k
            for k in set(expect["obligations"]) | set(got.get("obligations") or {})
            if (got.get("obligations") or {}).get(k) != expect["obligations"].get(k)
        )
        out.append("obligations differ: " + ", ".join(keys))
    alerts = (got.get("audit") or {}).get("alerts")
    if expect.get("alerts") and alerts != expect["alerts"]:
        out.append(f"alerts expected {json.dumps(expect['alerts'])}, got {json.dumps(alerts)}")
    return out


def check_fixtures(
    policies: Path, *, binary: str | None = None, timeout: float = DEFAULT_TOOL_TIMEOUT
) -> list[str]:
    """`file[index] "note": what differs` for every case of `<policies>/fixtures/*.json` the policy
    decides otherwise than its `expect` says (allow, sorted reason codes, and obligations and alerts
    when the case gives them). An unreadable fixture file is one entry too.
    """
    from mcp_fhir.governance.diff import BatchEvaluator

    folder = policies / "fixtures"
    if not folder.is_dir():
        return []
    cases: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = []
    failures = []
    for path in sorted(folder.glob("*.json")):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            failures.append(f"fixtures/{path.name}: not readable JSON")
            continue
        if not isinstance(items, list):
            failures.append(f"fixtures/{path.name}: must be a list of cases")
            continue
        for i, item in enumerate(items):
            if not (isinstance(item, Mapping) and isinstance(item.get("input"), Mapping)
                    and isinstance(item.get("expect"), Mapping)):  # fmt: skip
                failures.append(f"fixtures/{path.name}[{i}]: needs an `input` and an `expect` object")
                continue
            cases.append(
                (f'fixtures/{path.name}[{i}] "{item.get("note") or ""}"', item["input"], item["expect"])
            )
    if cases:
        evaluator = BatchEvaluator(policies, binary=binary, timeout=timeout, workers=1)
        decisions = evaluator.evaluate([inp for _, inp, _ in cases])
        for (name, _, expect), decision in zip(cases, decisions, strict=True):
            diff = _fixture_mismatch(decision, expect)
            if diff:
                failures.append(f"{name}: {'; '.join(diff)}")
    return failures


def find_regal() -> str | None:
    """Regal from the project's .tools/bin or $PATH, or None when it is not installed."""
    for candidate in (str(_PROJECT_REGAL), shutil.which("regal")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class LintResult:
    """One line per check: its name, whether it passed, and what it said."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def summary(self) -> str:
        lines = []
        for name, ok, output in self.checks:
            lines.append(f"{'ok  ' if ok else 'FAIL'} {name}")
            lines += [f"     {line}" for line in output.strip().splitlines()[:40]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def run_lint(
    policies: Path, *, binary: str | None = None, timeout: float = DEFAULT_TOOL_TIMEOUT
) -> LintResult:
    """`opa fmt --fail -l`, `opa check --strict`, and `regal lint` when Regal is installed."""
    if not policies.is_dir():
        raise ConfigError("policy.lint.policies", "must be a folder")
    opa = find_opa(binary)
    result = LintResult()
    fmt = _exec([opa, "fmt", "--fail", "-l", str(policies)], timeout)
    result.checks.append(("opa fmt --fail -l", fmt.returncode == 0, (fmt.stdout + fmt.stderr)))
    check = _exec([opa, "check", "--strict", *_ignores(), str(policies)], timeout)
    result.checks.append(("opa check --strict", check.returncode == 0, check.stdout + check.stderr))
    regal = find_regal()
    if regal is None:
        result.checks.append(("regal lint (not installed: skipped)", True, ""))
    else:
        lint = _exec([regal, "lint", str(policies)], timeout)
        result.checks.append(("regal lint", lint.returncode == 0, lint.stdout + lint.stderr))
    return result


@dataclass(frozen=True, slots=True)
class FiredRule:
    """A rule whose body succeeded during the evaluation."""

    name: str
    file: str
    row: int
    times: int

    @property
    def is_deny(self) -> bool:
        return self.name == "deny" or self.name.endswith(".deny")


def _rule_name(head: Mapping[str, Any]) -> str:
    if head.get("name"):
        return str(head["name"])
    parts = []
    for term in head.get("ref") or []:
        value = term.get("value")
        if term.get("type") in ("var", "string") and isinstance(value, str):
            parts.append(value)
    return ".".join(parts) or "?"


def fired_rules(explanation: list[Mapping[str, Any]]) -> list[FiredRule]:
    """Rules that exited (their body succeeded), in file/line order, with how often."""
    counts: dict[tuple[str, str, int], int] = {}
    for event in explanation:
        node = event.get("Node")
        if event.get("Op") != "Exit" or not isinstance(node, Mapping) or "head" not in node:
            continue
        loc = event.get("Location") or {}
        key = (_rule_name(node["head"]), str(loc.get("file") or "?"), int(loc.get("row") or 0))
        counts[key] = counts.get(key, 0) + 1
    return [
        FiredRule(n, f, r, c) for (n, f, r), c in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][2]))
    ]


def explain(
    policies: Path,
    decision_input: Mapping[str, Any],
    *,
    binary: str | None = None,
    timeout: float = DEFAULT_TOOL_TIMEOUT,
) -> tuple[dict[str, Any] | None, list[FiredRule]]:
    """The decision for one input and the rules that fired, from `opa eval --explain=full`."""
    opa = find_opa(binary)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.json"
        path.write_text(json.dumps(decision_input), encoding="utf-8")
        cmd = [opa, "eval", "--format", "json", "--explain", "full", "-d", str(policies), *_ignores(),
               "-i", str(path), DECISION_QUERY]  # fmt: skip
        proc = _exec(cmd, timeout)
    if proc.returncode != 0:
        raise PolicyUnavailable("opa eval failed: " + " | ".join(proc.stderr.strip().splitlines()[:3]))
    try:
        body = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise PolicyUnavailable("opa eval answered with something that is not JSON") from exc
    try:
        decision = body["result"][0]["expressions"][0]["value"]
    except (KeyError, IndexError, TypeError):
        decision = None
    return decision, fired_rules(body.get("explanation") or [])
