"""The examples prove themselves: each runnable one runs here against the real test bed and must pass.

- examples/agent/agent.py runs against a real `mcp-fhir serve` with a nurse and a clinician API key,
  and exits 0; with the keys swapped it must exit 1 (it can fail), and with no keys 2;
- examples/clients/claude-desktop.json's stdio entry is started as written (its config swapped for one
  over the test bed) and driven with the official MCP stdio client; its HTTP entry points at /mcp with
  a bearer header from the environment;
- examples/configs/*.yaml are checked by tests/test_config.py; examples/grafana/dashboard.json by
  tests/test_compose.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mcp import Client, StdioServerParameters

from tests.integration._ops_harness import REPO, ApiKeyIdentity, ServedSidecar, http_config
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, NURSE, sidecar_config

pytestmark = pytest.mark.integration

AGENT = REPO / "examples" / "agent" / "agent.py"
DESKTOP = json.loads((REPO / "examples" / "clients" / "claude-desktop.json").read_text(encoding="utf-8"))
AGENT_TIMEOUT = 120.0


@pytest.fixture
def keys() -> dict[str, ApiKeyIdentity]:
    return {"nurse": ApiKeyIdentity(NURSE), "clinician": ApiKeyIdentity(CLINICIAN)}


@pytest.fixture
def sidecar(tmp_path: Path, fhir_server, keys):
    with ServedSidecar(tmp_path, http_config(tmp_path, fhir_server.base_url, list(keys.values()))) as served:
        yield served


def run_agent(sidecar: ServedSidecar, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_")}
    return subprocess.run(
        [sys.executable, str(AGENT), "--url", sidecar.mcp_url, "--patient", data.AU_PATIENT_ID],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT,
    )


def test_the_agent_example_sees_every_decision_it_expects_and_exits_zero(sidecar, keys):
    done = run_agent(
        sidecar, {"MCP_FHIR_NURSE_KEY": keys["nurse"].key, "MCP_FHIR_CLINICIAN_KEY": keys["clinician"].key}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "policy_denied" in done.stdout and "decision " in done.stdout
    assert "all 6 decisions as expected" in done.stdout


def test_the_agent_example_exits_one_when_a_decision_is_not_the_expected_one(sidecar, keys):
    swapped = {"MCP_FHIR_NURSE_KEY": keys["clinician"].key, "MCP_FHIR_CLINICIAN_KEY": keys["nurse"].key}
    done = run_agent(sidecar, swapped)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "UNEXPECTED" in done.stdout


def test_the_agent_example_exits_two_without_its_keys(sidecar):
    assert run_agent(sidecar, {}).returncode == 2


async def test_the_claude_desktop_stdio_entry_starts_a_working_server(tmp_path, fhir_server):
    entry = DESKTOP["mcpServers"]["mcp-fhir-stdio"]
    assert Path(entry["command"]).name == "mcp-fhir"
    args = list(entry["args"])
    shipped = args[args.index("--config") + 1]
    assert (REPO / "examples" / "configs" / Path(shipped).name).exists()
    config_path = tmp_path / "stdio.yaml"
    config_path.write_text(yaml.safe_dump(sidecar_config(tmp_path, fhir_server.base_url)), encoding="utf-8")
    args[args.index("--config") + 1] = str(config_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_")}
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_fhir.cli.main", *args],
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=str(tmp_path),
    )
    async with Client(params) as client:
        tools = await client.list_tools()
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    assert "read_patient" in {t.name for t in tools.tools}
    assert not result.is_error, result.content[0].text


def test_the_claude_desktop_http_entry_targets_the_mcp_path_with_a_bearer_header_from_the_environment():
    entry = DESKTOP["mcpServers"]["mcp-fhir-http"]
    url = next(a for a in entry["args"] if a.startswith("http"))
    assert url.endswith("/mcp")
    header = entry["args"][entry["args"].index("--header") + 1]
    assert header == "Authorization: Bearer ${MCP_FHIR_API_KEY}"
    assert "MCP_FHIR_API_KEY" in entry["env"]
    assert any(a.startswith("mcp-remote@") and a.split("@")[1][0].isdigit() for a in entry["args"])
