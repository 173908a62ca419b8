"""The agent-facing surface over stdio: `mcp-fhir serve --config FILE` as a subprocess.

The official MCP client spawns the real CLI (`StdioServerParameters`); the config in tmp_path
names `server.transport: stdio` and an `auth.local` identity, and the managed OPA starts inside
the server process. Both protocol revisions are exercised: the 2.x default (2026-07-28) and the
handshake revisions (`mode="legacy"`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from tests.integration.test_surface_http import NURSE_TOOLS, READ_ARGS, audit_records
from tests.testbed import data
from tests.testbed.sidecar import AUDITOR, CLINICIAN, NURSE, REPO, sidecar_config

pytestmark = pytest.mark.integration

MCP_FHIR: Final = Path(sys.executable).with_name("mcp-fhir")
STDIO_READ_TIMEOUT: Final = 60.0


def write_config(workdir: Path, fhir_base_url: str, identity: Mapping[str, Any]) -> Path:
    cfg = sidecar_config(workdir, fhir_base_url, identity=dict(identity), transport="stdio")
    path = workdir / "mcp-fhir.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@asynccontextmanager
async def stdio_sidecar(
    workdir: Path, fhir_base_url: str, identity: Mapping[str, Any], *, mode: str = "auto"
) -> AsyncIterator[Client]:
    """`mcp-fhir serve` as a child process; its stderr goes to workdir/stderr.log."""
    config_path = write_config(workdir, fhir_base_url, identity)
    params = StdioServerParameters(
        command=str(MCP_FHIR),
        args=["serve", "--config", str(config_path), "--log-level", "WARNING"],
        cwd=str(REPO),
    )
    with (workdir / "stderr.log").open("w", encoding="utf-8") as errlog:
        async with Client(
            stdio_client(params, errlog=errlog), mode=mode, read_timeout_seconds=STDIO_READ_TIMEOUT
        ) as client:
            yield client


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_nurse_over_stdio_reads_a_patient_and_sees_only_her_tools(tmp_path, fhir_server, mode):
    async with stdio_sidecar(tmp_path, fhir_server.base_url, NURSE, mode=mode) as client:
        version = client.protocol_version
        tools = {t.name for t in (await client.list_tools()).tools}
        result = await client.call_tool("read_patient", READ_ARGS)
        denied = await client.call_tool("search_medication_statements", READ_ARGS)
    assert version == ("2026-07-28" if mode == "auto" else "2025-11-25")
    assert tools == NURSE_TOOLS
    assert not result.is_error, result.content[0].text
    assert result.structured_content["resources"][0]["id"] == data.AU_PATIENT_ID
    err = json.loads(denied.content[0].text)
    assert denied.is_error and err["code"] == "policy_denied" and err["decision_id"]
    records = audit_records(tmp_path / "audit.jsonl", "access")
    assert [(r["result"], r["subject_id"], r["authn"]) for r in records] == [
        ("allowed", NURSE["id"], "local"),
        ("denied", NURSE["id"], "local"),
    ]
    assert "Traceback" not in (tmp_path / "stderr.log").read_text(encoding="utf-8")


async def test_a_clinician_over_stdio_uses_resources_and_prompts(tmp_path, fhir_server):
    async with stdio_sidecar(tmp_path, fhir_server.base_url, CLINICIAN) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        catalogue = json.loads((await client.read_resource("mcp-fhir://tools")).contents[0].text)
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        with pytest.raises(MCPError) as summary:  # a local identity binds no purpose: a denial, as an error
            await client.read_resource(f"fhir-summary://patient/{data.AU_PATIENT_ID}")
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        prompt = await client.get_prompt("medication_reconciliation", {"patient_id": data.AU_PATIENT_ID})
        with pytest.raises(MCPError) as unknown_tool:
            await client.call_tool("no_such_tool", {})
    assert set(catalogue) == tools and "create_clinical_note" in tools
    assert templates == ["fhir-summary://patient/{patient_id}"]
    denial = summary.value.error.data
    assert denial["code"] == "policy_denied" and "PURPOSE_REQUIRED" in denial["reasons"]
    assert "medication_reconciliation" in prompts
    assert data.AU_PATIENT_ID in prompt.messages[0].content.text
    assert unknown_tool.value.error.code == -32602


async def test_an_auditor_over_stdio_sees_the_audit_log_tool_and_no_patient_tools(tmp_path, fhir_server):
    async with stdio_sidecar(tmp_path, fhir_server.base_url, AUDITOR, mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        patient = await client.call_tool("read_patient", READ_ARGS)
    assert "search_audit_log" in tools
    assert not tools & NURSE_TOOLS
    assert patient.is_error and json.loads(patient.content[0].text)["code"] == "policy_denied"
