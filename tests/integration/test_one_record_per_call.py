"""One record per call (#19 §5), end to end: the official MCP client, the real OPA, the real FHIR test bed.

The policy here is a copy of `policies/` whose business hours have no days, so every call is after
hours, whatever the wall clock says: the decision's `after_hours` alert is in the call's own access
record, no `kind: alert` record is written beside it, and `mcp-fhir audit query --alert after_hours`
(a real process) finds the call. The `search_audit_log` tool reads the same access records, so the
alert reaches it inside each event (`tests/audit/test_export_fhir.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import NURSE, POLICIES, REPO, sidecar_config

pytestmark = pytest.mark.integration

HOURS = Path("mcp_fhir") / "config" / "hours" / "data.yaml"
WEEKDAYS = "days: [Monday, Tuesday, Wednesday, Thursday, Friday]"
CLI_TIMEOUT = 60.0


def _always_after_hours(workdir: Path) -> Path:
    copy = workdir / "policies"
    shutil.copytree(POLICIES, copy)
    hours = copy / HOURS
    text = hours.read_text(encoding="utf-8")
    if WEEKDAYS not in text:
        raise AssertionError("the business hours data changed shape; update this helper's edit")
    hours.write_text(text.replace(WEEKDAYS, "days: []"), encoding="utf-8")
    return copy


def _stored(path: Path) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["record"] for e in entries if "record" in e]


async def test_an_after_hours_call_writes_exactly_one_record_and_the_cli_finds_it_by_its_alert(
    tmp_path: Path, fhir_server: Any
) -> None:
    cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=NURSE)
    cfg["opa"]["policies"] = str(_always_after_hours(tmp_path))
    async with Client(build_server(config.from_mapping(cfg))) as client:
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert not result.is_error
    trail = tmp_path / "audit.jsonl"
    [record] = _stored(trail)
    assert (record["kind"], record["tool"], record["result"]) == ("access", "read_patient", "allowed")
    assert record["alerts"] == ["after_hours"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    found = subprocess.run(
        [sys.executable, "-m", "mcp_fhir.cli.main", "audit", "query", "--path", str(trail),
         "--alert", "after_hours", "--json"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env, check=False,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)["records"]
    assert [(r["kind"], r["request_id"]) for r in rows] == [("access", record["request_id"])]
