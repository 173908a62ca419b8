#!/usr/bin/env bash
# Put OPA v1.22.3 at .tools/bin/opa: reuse the binary already there, else the machine-wide cache
# (so a fresh clone on the same machine does not rebuild), else build it from the Go module proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
OPA_VERSION=v1.22.3
CACHE=${MCP_FHIR_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mcp-fhir}/opa-$OPA_VERSION
# Compare captured output: `opa version | grep -q` fails under pipefail when grep exits first (SIGPIPE).
have() { [ -x "$1" ] && [[ "$("$1" version 2>/dev/null)" == *"Version: ${OPA_VERSION#v}"* ]]; }

mkdir -p .tools/bin
have .tools/bin/opa && exit 0
if ! have "$CACHE/opa"; then
  echo "building OPA $OPA_VERSION from the Go module proxy (one time per machine, about 2 minutes)" >&2
  mkdir -p "$CACHE"
  started=$SECONDS
  GOBIN="$CACHE" GOFLAGS=-mod=mod go install "github.com/open-policy-agent/opa@$OPA_VERSION"
  echo "built OPA $OPA_VERSION in $((SECONDS - started)) s" >&2
fi
cp "$CACHE/opa" .tools/bin/opa
