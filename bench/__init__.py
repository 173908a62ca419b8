"""The benchmark harness for mcp-fhir (issue #10): `python -m bench.run`. See docs/performance.md."""
