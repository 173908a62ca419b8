"""The audit trail through the real sidecar: correlated with OPA's decision log, and crash-safe.

* The sidecar's record and OPA's decision-log event share the decision id, and OPA's copy of the
  input is masked by `policies/system/log` (no patient id).
* `mcp-fhir serve` is SIGKILLed in the middle of a concurrent load, restarted on the same trail,
  and the chain verifies against the pinned key and the witness named by its config: every call
  whose result reached a client has its record, and none of them is in a range the restarted writer
  declared unvouched (records of a batch whose signature the kill cut off were never acknowledged).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_fhir import config
from mcp_fhir.agent_auth.api_keys import generate_api_key
from mcp_fhir.policy.managed_opa import free_port
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import NURSE, REPO, SidecarProcess, api_key_entry, http_config, sidecar_config

pytestmark = pytest.mark.integration

CLIENTS = 6
ACKS_BEFORE_KILL = 60
CALLS_PER_CLIENT_MAX = 200  # bounds the load even if the kill were late


def records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line after the kill: recovery handles it on restart
        if "record" in entry:
            out.append(entry["record"])
    return out


async def test_the_audit_record_and_opas_decision_log_share_the_decision_id_and_opa_masks_the_patient(
    tmp_path, fhir_server
):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=NURSE))
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
        )
    decision_id = result.structured_content["provenance"]["decision_id"]
    [record] = [r for r in records(tmp_path / "audit.jsonl") if r["kind"] == "access"]
    assert record["decision_id"] == decision_id
    log_lines = (tmp_path / "opa-decisions.log").read_text().splitlines()
    events = [json.loads(line) for line in log_lines if line.startswith("{")]
    [event] = [e for e in events if e.get("decision_id") == decision_id]
    assert event["path"] == "mcp_fhir/authz/decision"
    assert data.AU_PATIENT_ID not in json.dumps(event["input"])
    assert record["patient"] == data.AU_PATIENT_ID


async def _load(url: str, key: str, acked: list[str], enough: asyncio.Event) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=10.0)
    try:
        async with Client(streamable_http_client(url + "/mcp", http_client=http)) as client:
            for _ in range(CALLS_PER_CLIENT_MAX):
                result = await client.call_tool(
                    "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
                )
                if not result.is_error:
                    acked.append(result.structured_content["provenance"]["decision_id"])
                if len(acked) >= ACKS_BEFORE_KILL:
                    enough.set()
    except Exception:  # the server is killed under us; what was acknowledged is what counts
        return


async def test_a_sigkill_mid_load_loses_no_acknowledged_record_and_the_chain_verifies(tmp_path, fhir_server):
    key, digest = generate_api_key()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = http_config(tmp_path, fhir_server.base_url, port, [api_key_entry(NURSE, digest)])
    acked: list[str] = []
    sidecar = SidecarProcess(cfg, url=url).start()
    try:
        enough = asyncio.Event()
        load = [asyncio.create_task(_load(url, key, acked, enough)) for _ in range(CLIENTS)]
        await asyncio.wait_for(enough.wait(), timeout=60)
        sidecar.kill()
        acked_at_kill = list(acked)
        await asyncio.gather(*load)
    finally:
        sidecar.kill()
    with SidecarProcess(cfg, url=url):
        await _load(url, key, acked, asyncio.Event())  # the restarted server resumes the chain
    audit = tmp_path / "audit.jsonl"
    recorded = {r["decision_id"] for r in records(audit) if r["kind"] == "access"}
    assert set(acked_at_kill) <= recorded
    verify = _verify(cfg)
    if not verify["ok"]:
        assert verify["problem"]["kind"] == "unvouched", verify["problem"]
        unvouched = {s for g in verify["unvouched"] for s in range(g["from"], g["to"] + 1)}
        entries = [json.loads(x) for x in audit.read_text().splitlines()]
        doubtful = {
            e["record"].get("decision_id") for e in entries if "record" in e and e["seq"] in unvouched
        }
        assert not doubtful & set(acked_at_kill)
        verify = _verify(cfg, *[f"--accept-recovery={g['recovery_seq']}" for g in verify["unvouched"]])
    assert verify["ok"], verify["problem"]
    assert verify["witness_checked"] and verify["signatures_checked"]


def _verify(cfg: Path, *extra: str) -> dict:
    done = subprocess.run(
        [str(REPO / ".venv/bin/mcp-fhir"), "audit", "verify", "--config", str(cfg), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)
