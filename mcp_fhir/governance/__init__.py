"""Policy lifecycle tooling for CI and auditors: diff, grid, replay, reports and bundles.

Nothing here runs per call; the call path's decide step lives in `mcp_fhir.policy`.
"""
