#!/usr/bin/env bash
# Print the in-process cost (ns/op, `opa bench`) and the number of evaluation steps (`opa eval
# --explain full`, the stable measure on a shared machine) of the decision and visible_tools entry
# points for a few representative inputs: allow, deny, malformed, visible_tools.
# Usage: policies/bench.sh [count]   (count: repetitions per input, the median is printed)
#        POLICIES=/other/checkout/policies policies/bench.sh
#        STORE= policies/bench.sh   (OPA's default store instead of the read-optimised one the sidecar runs)
set -euo pipefail
cd "$(dirname "$0")/.."
OPA=${OPA:-.tools/bin/opa}
POLICIES=${POLICIES:-policies/} # e.g. another checkout's policies/, to compare before and after
COUNT=${1:-3}
STORE=${STORE---optimize-store-for-read-speed} # as the managed OPA and compose run it
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

subject='{"id": "agent-1", "authn": "oauth", "claims": {"roles": ["nurse"]},
  "scopes": ["user/Patient.rs", "user/Observation.rs"], "on_behalf_of": null}'
context='{"purpose": "treatment", "time": "2026-03-10T02:00:00.000Z", "break_glass": null,
  "backend": "default", "request_id": "req-1"}'
cat >"$tmp/allow.json" <<JSON
{"subject": $subject, "action": {"tool": "read_patient", "operation": "read", "resource_type": "Patient"},
 "resource": {"patient": "pat-au-001", "params": {}}, "context": $context}
JSON
cat >"$tmp/deny.json" <<JSON
{"subject": $subject,
 "action": {"tool": "search_medication_statements", "operation": "search", "resource_type": "MedicationStatement"},
 "resource": {"patient": "pat-au-001", "params": {}}, "context": $context}
JSON
cat >"$tmp/malformed.json" <<JSON
{"subject": $subject, "action": {"tool": "", "operation": "zap", "resource_type": 3},
 "resource": {"patient": "pat-au-001", "params": {}},
 "context": {"purpose": "treatment", "time": "2026-02-30T25:00:00Z", "break_glass": null}}
JSON
cat >"$tmp/visible.json" <<JSON
{"subject": $subject, "context": {"backend": "default", "time": "2026-03-10T02:00:00.000Z"}}
JSON

bench() { # query input -> median ns/op over COUNT runs
	for _ in $(seq "$COUNT"); do
		# shellcheck disable=SC2086 # STORE is one flag or empty
		"$OPA" bench $STORE --ignore '*_test.rego' --ignore fixtures -d "$POLICIES" --input "$2" "$1" \
			--format gobench --metrics=false | awk '/^BenchmarkOPAEval/ {print $3}'
	done | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'
}

steps() { # query input -> number of expressions evaluated (deterministic)
	"$OPA" eval --ignore '*_test.rego' --ignore fixtures -d "$POLICIES" --input "$2" --format pretty \
		--explain full "$1" | grep -c '| Eval'
}

printf '%-14s %-40s %12s %7s\n' input query ns/op steps
for case in allow deny malformed; do
	q=data.mcp_fhir.authz.decision
	printf '%-14s %-40s %12s %7s\n' "$case" "$q" "$(bench "$q" "$tmp/$case.json")" "$(steps "$q" "$tmp/$case.json")"
done
q=data.mcp_fhir.authz.visible_tools
printf '%-14s %-40s %12s %7s\n' visible "$q" "$(bench "$q" "$tmp/visible.json")" "$(steps "$q" "$tmp/visible.json")"
printf 'load average: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
