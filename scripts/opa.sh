#!/usr/bin/env bash
# Build OPA v1.22.3 into .tools/bin from the Go module proxy, or reuse the binary already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OPA_VERSION=v1.22.3
if [ -x .tools/bin/opa ] && .tools/bin/opa version 2>/dev/null | grep -q "Version: ${OPA_VERSION#v}"; then
  exit 0
fi
echo "building OPA $OPA_VERSION into .tools/bin (one time, about 2 minutes)" >&2
mkdir -p .tools/bin
GOBIN="$PWD/.tools/bin" GOFLAGS=-mod=mod go install "github.com/open-policy-agent/opa@$OPA_VERSION"
