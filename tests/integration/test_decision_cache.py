"""The decision cache through the real sidecar, the real OPA and the MCP client.

On: the same call three times is one OPA evaluation (one decision-log event) and three audit records,
each naming that decision id, the first a `miss` and the others `hit`. Off (the default): three
evaluations, three decision ids, and no record mentions a decision cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import NURSE, sidecar_config

pytestmark = pytest.mark.integration

CALLS = 3


def _access_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line).get("record") or {}
        if record.get("kind") == "access":
            out.append(record)
    return out


def _decision_events(path: Path) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("path") == "mcp_fhir/authz/decision"]


async def _three_reads(tmp_path: Path, fhir_url: str, **opa: Any) -> list[dict[str, Any]]:
    cfg = sidecar_config(tmp_path, fhir_url, identity=NURSE)
    cfg["opa"] = {**cfg["opa"], **opa}
    async with Client(build_server(config.from_mapping(cfg))) as client:
        for _ in range(CALLS):
            result = await client.call_tool(
                "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
            )
            assert not result.is_error
    return _access_records(tmp_path / "audit.jsonl")


async def test_with_the_cache_on_one_evaluation_serves_three_calls_each_with_its_own_record(
    tmp_path, fhir_server
):
    records = await _three_reads(tmp_path, fhir_server.base_url, decision_cache=True)
    assert [r["extra"].get("decision_cache") for r in records] == ["miss", "hit", "hit"]
    assert len({r["decision_id"] for r in records}) == 1
    assert len({r["request_id"] for r in records}) == CALLS
    events = _decision_events(tmp_path / "opa-decisions.log")
    assert [e["decision_id"] for e in events] == [records[0]["decision_id"]]


async def test_with_the_cache_off_every_call_is_evaluated_and_no_record_mentions_the_cache(
    tmp_path, fhir_server
):
    records = await _three_reads(tmp_path, fhir_server.base_url)
    assert all("decision_cache" not in r["extra"] for r in records)
    assert len({r["decision_id"] for r in records}) == CALLS
    assert len(_decision_events(tmp_path / "opa-decisions.log")) == CALLS
