.PHONY: demo test bench setup

# The demo: sets up what is missing, starts OPA, the FHIR test bed and the sidecar, and runs a scripted agent session.
demo: setup
	.venv/bin/python scripts/demo.py

# The whole test suite (what CI runs).
test:
	bash scripts/test.sh

# The benchmark harness (see docs/performance.md).
bench: setup
	.venv/bin/python -m bench.run

setup:
	bash scripts/bootstrap.sh
