#!/usr/bin/env bash
# Set up everything the demo and the tests need on a fresh machine; fast when it is already there.
#   .venv (Python deps), .tools/bin/opa (OPA v1.22.3 from the Go module proxy), the FHIR test bed's Node 22 deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: creating .venv and installing Python dependencies" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" >&2
  rm -f .venv/.installed-* && touch "$stamp"
fi
echo "bootstrap: OPA: reusing .tools/bin/opa or the machine cache, else building it (one time, about 2 minutes)" >&2
scripts/opa.sh
echo "bootstrap: OPA ready: $(.tools/bin/opa version 2>/dev/null | sed -n 1p)" >&2
scripts/testbed.sh >&2
scripts/node-tools.sh >&2
