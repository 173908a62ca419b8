#!/usr/bin/env bash
# Policy CI for a pull request: test, lint, and diff the proposed policies/ against a base.
#
#   examples/policy-ci/check.sh [BASE] [HEAD]     (defaults: origin/main or HEAD~1, and the working tree)
#   examples/policy-ci/check.sh --self-test       (proves the gate: a widening must fail it)
#
# BASE/HEAD are git refs, WORKTREE, or policies/ folders. Approvals are read from BASE. Writes into
# $REPORT_DIR (default ./policy-report): policy-report.md (the summary for the PR comment, capped at
# $MAX_CHARS, default 60000; a comment holds 65536), policy-report-full.md, policy-report.json and
# policy-report.html (the full report, uploaded as an artifact). Exits non-zero when the Rego tests
# or a fixture fail, coverage is under the threshold, lint fails, or the diff finds an unapproved
# widening or a change to approvals.yaml. $DIFF_FLAGS adds flags to the diff (e.g. --full-grid).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
CLI=("$PY" -m mcp_fhir.cli.main policy)
REPORT_DIR="${REPORT_DIR:-$ROOT/policy-report}"
THRESHOLD="${THRESHOLD:-95}"
MAX_CHARS="${MAX_CHARS:-60000}"
mkdir -p "$REPORT_DIR"

gate() {  # gate BASE HEAD-policies-folder: test + lint HEAD, diff BASE..HEAD
  local base="$1" head="$2" rc=0
  echo "== policy test ($head)"; "${CLI[@]}" test --policies "$head" --threshold "$THRESHOLD" || rc=1
  echo "== policy lint ($head)"; "${CLI[@]}" lint --policies "$head" || rc=1
  echo "== policy diff $base -> $head"
  # shellcheck disable=SC2086  # DIFF_FLAGS is a list of flags
  "${CLI[@]}" diff "$base" "$head" ${REPLAY:+--replay "$REPLAY"} ${DIFF_FLAGS:-} --format md --max-chars "$MAX_CHARS" \
      --out "$REPORT_DIR/policy-report.md" --full-md "$REPORT_DIR/policy-report-full.md" \
      --json-out "$REPORT_DIR/policy-report.json" --html "$REPORT_DIR/policy-report.html" || rc=1
  return $rc
}

if [[ "${1:-}" == "--self-test" ]]; then
  # 1. the shipped policies against themselves must pass the gate (fixtures only: the same tree on
  #    both sides cannot differ, and the grid's ~20,600 decisions, 10,320 inputs on each side, would prove nothing more here)
  DIFF_FLAGS="--no-grid" gate policies policies || { echo "self-test: the unchanged policies failed the gate" >&2; exit 1; }
  # 2. a copy where the nurse role gains MedicationStatement must FAIL it (unapproved widening)
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  cp -r policies "$tmp/policies"
  sed -i 's/^  read: \[Observation, Patient\]$/  read: [MedicationStatement, Observation, Patient]/' \
      "$tmp/policies/mcp_fhir/config/roles/data.yaml"
  grep -q 'read: \[MedicationStatement, Observation, Patient\]' "$tmp/policies/mcp_fhir/config/roles/data.yaml" \
      || { echo "self-test: could not apply the widening edit" >&2; exit 1; }
  if "${CLI[@]}" diff policies "$tmp/policies" --no-grid --quiet --out "$REPORT_DIR/self-test.md"; then
    echo "self-test: an unapproved widening PASSED the gate" >&2; exit 1
  fi
  grep -q 'unapproved widening' "$REPORT_DIR/self-test.md" \
      || { echo "self-test: the report does not name the widening" >&2; exit 1; }
  # 3. the same widening with its own approval added to the copy's approvals.yaml must still FAIL it
  cat >> "$tmp/policies/approvals.yaml" <<'YAML'
  - id: APR-SELF
    role: nurse
    tool: "*"
    purpose: "*"
    kind: "*"
    reviewer: the.author@example.org
    ticket: SELF-1
YAML
  sed -i 's/^approvals: \[\]$/approvals:/' "$tmp/policies/approvals.yaml"
  if "${CLI[@]}" diff policies "$tmp/policies" --no-grid --quiet --out "$REPORT_DIR/self-approved.md"; then
    echo "self-test: a widening that approves itself PASSED the gate" >&2; exit 1
  fi
  grep -q 'approvals.yaml need review' "$REPORT_DIR/self-approved.md" \
      || { echo "self-test: the report does not flag the approvals change" >&2; exit 1; }
  echo "self-test: ok (unchanged policies pass; an unapproved or self-approved widening fails)"
  exit 0
fi

BASE="${1:-$(git rev-parse --verify -q origin/main >/dev/null && echo origin/main || echo HEAD~1)}"
HEAD_POLICIES="${2:-policies}"
gate "$BASE" "$HEAD_POLICIES"
