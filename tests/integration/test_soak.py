"""Issue #11 (4), the CI form of the soak: 1,200 calls from 16 concurrent MCP clients over streamable HTTP
against `mcp-fhir serve` (API keys, managed OPA, the real FHIR test bed), mixing allowed, denied and
erroring calls. The full run (20,000 calls, 64 clients) is `scripts/soak.py`; its figures are in
docs/security.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

CI_CALLS = 1_200  # keeps the whole test, server start included, under a minute on 2 cores
CI_CLIENTS = 16
SOAK_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def _soak_module() -> Any:
    spec = importlib.util.spec_from_file_location("mcp_fhir_soak", SOAK_SCRIPT)
    if spec is None or spec.loader is None:
        raise RuntimeError("scripts/soak.py is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(180)
async def test_a_short_soak_keeps_audit_count_chain_patient_isolation_and_memory(
    tmp_path: Path, fhir_server: Any
) -> None:
    soak = _soak_module()
    report = await soak.run_soak(CI_CALLS, CI_CLIENTS, fhir_url=fhir_server.base_url, workdir=tmp_path)
    assert report.calls == CI_CALLS
    assert report.unexpected == []
    assert report.leaks == []
    assert report.audit_access_records == CI_CALLS
    assert report.chain_ok
    assert report.rss_growth_mb < report.rss_bound_mb
    assert sum(report.outcomes.values()) == CI_CALLS
    assert {key.rsplit(":", 1)[1] for key in report.outcomes} >= {"allowed", "denied", "error"}
