#!/usr/bin/env bash
# Run the benchmark harness with the project's venv: bench/run.sh [--quick] [--check bench/baseline.json] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench.run "$@"
