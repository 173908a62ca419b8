"""The examples prove themselves: each runnable one runs here against the real test bed and must pass.

- examples/agent/agent.py runs against a real `mcp-fhir serve` with a nurse and a clinician API key,
  and exits 0; with the keys swapped it must exit 1 (it can fail), and with no keys 2;
- examples/clients/claude-desktop.json's stdio entry is started as shipped (only the clone folder it names
  substituted), against the test bed its README's one-line command starts on the configured port, and
  driven with the official MCP stdio client; its HTTP entry points at /mcp with a bearer header from the
  environment;
- examples/configs/*.yaml are checked by tests/test_config.py; examples/grafana/dashboard.json by
  tests/test_compose.py.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from mcp import Client, StdioServerParameters

from tests.integration._ops_harness import REPO, ApiKeyIdentity, ServedSidecar, http_config
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, NURSE

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


SHIPPED_CLONE = "/opt/mcp-fhir"  # the clone folder claude-desktop.json names (examples/clients/README.md)
SERVE_TIMEOUT = 120.0


@contextmanager
def served_testbed(config_file: Path) -> Iterator[str]:
    """`scripts/testbed_serve.py --config FILE` (the example's one-line command), until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "testbed_serve.py"), "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    try:
        try:
            ready = lines.get(timeout=SERVE_TIMEOUT)
        except queue.Empty:
            ready = ""
        assert "ready at " in ready, (
            ready,
            proc.stderr.read() if proc.poll() is not None and proc.stderr else "",
        )
        yield ready.split("ready at ", 1)[1].split()[0]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_the_claude_desktop_stdio_entry_works_as_shipped_with_the_one_line_test_bed():
    entry = DESKTOP["mcpServers"]["mcp-fhir-stdio"]
    assert entry["command"] == f"{SHIPPED_CLONE}/.venv/bin/mcp-fhir"
    args = [a.replace(SHIPPED_CLONE, str(REPO)) for a in entry["args"]]
    config_file = Path(args[args.index("--config") + 1])
    base_url = yaml.safe_load(config_file.read_text(encoding="utf-8"))["backends"]["testbed"]["base_url"]
    port = urlsplit(base_url).port
    if not _port_free(port):
        pytest.skip(f"port {port} (the example's test bed port) is in use on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_")}
    with served_testbed(config_file) as served:
        assert served == base_url  # the test bed is where the shipped config looks
        params = StdioServerParameters(
            command=sys.executable,  # the clone's .venv/bin/mcp-fhir, with this checkout's code
            args=["-m", "mcp_fhir.cli.main", *args],
            env={**env, "PYTHONPATH": str(REPO)},
            cwd=str(REPO),
        )
        async with Client(params) as client:
            tools = await client.list_tools()
            result = await client.call_tool(
                "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
            )
    assert "read_patient" in {t.name for t in tools.tools}
    assert not result.is_error, result.content[0].text
    assert result.structured_content["resources"][0]["id"] == data.AU_PATIENT_ID


def test_the_test_bed_command_refuses_a_config_that_misses_the_test_bed_base(tmp_path):
    shipped = yaml.safe_load(
        (REPO / "examples" / "configs" / "testbed-stdio.yaml").read_text(encoding="utf-8")
    )
    shipped["backends"]["testbed"]["base_url"] = "http://127.0.0.1:8103/fhir"  # no /R4
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(shipped), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "testbed_serve.py"), "--config", str(wrong)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    assert done.returncode == 1
    assert "/fhir/R4" in done.stderr + done.stdout


def test_the_claude_desktop_http_entry_targets_the_mcp_path_with_a_bearer_header_from_the_environment():
    entry = DESKTOP["mcpServers"]["mcp-fhir-http"]
    url = next(a for a in entry["args"] if a.startswith("http"))
    assert url.endswith("/mcp")
    header = entry["args"][entry["args"].index("--header") + 1]
    assert header == "Authorization: Bearer ${MCP_FHIR_API_KEY}"
    assert "MCP_FHIR_API_KEY" in entry["env"]
    assert any(a.startswith("mcp-remote@") and a.split("@")[1][0].isdigit() for a in entry["args"])
