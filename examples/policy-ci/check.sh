#!/usr/bin/env bash
# Policy CI for a pull request: test, lint, and diff the proposed policies/ against a base.
#
#   examples/policy-ci/check.sh [BASE] [HEAD]     (defaults: origin/main or HEAD~1, and the working tree)
#   examples/policy-ci/check.sh --self-test       (proves the gate: a widening must fail it)
#
# BASE/HEAD are git refs or policies/ folders. Writes policy-report.md (the PR comment) and
# policy-report.html into $REPORT_DIR (default ./policy-report). Exits non-zero when the Rego tests
# fail, coverage is under the threshold, lint fails, or the diff finds an unapproved widening.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
CLI=("$PY" -m mcp_fhir.cli.main policy)
REPORT_DIR="${REPORT_DIR:-$ROOT/policy-report}"
THRESHOLD="${THRESHOLD:-95}"
mkdir -p "$REPORT_DIR"

gate() {  # gate BASE HEAD-policies-folder: test + lint HEAD, diff BASE..HEAD
  local base="$1" head="$2" rc=0
  echo "== policy test ($head)"; "${CLI[@]}" test --policies "$head" --threshold "$THRESHOLD" || rc=1
  echo "== policy lint ($head)"; "${CLI[@]}" lint --policies "$head" || rc=1
  echo "== policy diff $base -> $head"
  "${CLI[@]}" diff "$base" "$head" ${REPLAY:+--replay "$REPLAY"} --format md \
      --out "$REPORT_DIR/policy-report.md" --html "$REPORT_DIR/policy-report.html" || rc=1
  return $rc
}

if [[ "${1:-}" == "--self-test" ]]; then
  # 1. the shipped policies against themselves must pass the gate
  gate policies policies || { echo "self-test: the unchanged policies failed the gate" >&2; exit 1; }
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
  echo "self-test: ok (unchanged policies pass; an unapproved widening fails)"
  exit 0
fi

BASE="${1:-$(git rev-parse --verify -q origin/main >/dev/null && echo origin/main || echo HEAD~1)}"
HEAD_POLICIES="${2:-policies}"
gate "$BASE" "$HEAD_POLICIES"
