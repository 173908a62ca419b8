"""The demo: two agents, one sidecar, the real OPA and a real FHIR server, and the audit trail they leave.

    make demo

It starts the FHIR test bed (Medplum's FHIR router, loaded with the synthetic patients), then
`mcp-fhir serve` over streamable HTTP (which starts its own OPA child), and drives a scripted
session through the official MCP Python client with three API keys: a nurse agent, a clinician
agent and an auditor agent. It prints each call, allowed or denied and why, then the audit records
those calls wrote, and verifies the audit chain. It exits non-zero if anything is not as it should be.

The last scene: a patient (pat-au-002) has opted out of processing by AI agents (a FHIR Consent in
the EHR; the sidecar reads consent with `consent.enabled`), so the clinician agent is denied
`CONSENT_DENIED`; then the auditor agent asks for that patient's accounting of disclosures.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from mcp_fhir.agent_auth.api_keys import generate_api_key  # noqa: E402
from mcp_fhir.policy.managed_opa import free_port  # noqa: E402
from tests.testbed import data  # noqa: E402
from tests.testbed.fhir import start_fhir_server  # noqa: E402
from tests.testbed.sidecar import (  # noqa: E402
    AUDITOR,
    CLINICIAN,
    NURSE,
    SidecarProcess,
    api_key_entry,
    http_config,
)

CONSENT_PATIENT = data.AU_DVA_PATIENT_ID
AI_OPT_OUT = REPO / "tests" / "data" / "consent" / "ai-opt-out.json"  # patient pat-au-002

BOLD, DIM, GREEN, RED, RESET = (
    ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m") if sys.stdout.isatty() else ("", "", "", "", "")
)
failures: list[str] = []


def expect(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)
        print(f"  {RED}UNEXPECTED: {what}{RESET}")


def show(agent: str, tool: str, args: dict[str, Any], result: Any) -> dict[str, Any]:
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if k != "break_glass_reason")
    if "break_glass_reason" in args:
        shown += ", break_glass_reason=…"
    print(f"\n{BOLD}{agent}{RESET} → {tool}({shown})")
    if result.is_error:
        err = json.loads(result.content[0].text)
        print(
            f"  {RED}DENIED{RESET} {err['code']}: reasons {err.get('reasons')} · decision {err.get('decision_id')}"
        )
        return err
    body = result.structured_content or {}
    withheld = body.get("withheld") or {}
    held = sum(v for k, v in withheld.items() if k != "redacted_elements")
    prov = body.get("provenance") or {}
    print(
        f"  {GREEN}ALLOWED{RESET} {body.get('count')} {body.get('resource_type', '')} returned, {held} withheld by "
        f"policy · decision {prov.get('decision_id')} · cache {prov.get('cache')}"
    )
    for line in result.content[0].text.splitlines()[1:4]:
        print(f"  {DIM}{line}{RESET}")
    return body


def agent(url: str, key: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30.0)
    return Client(streamable_http_client(url + "/mcp", http_client=http))


def load_consent(fhir: Any) -> None:
    """The patient's AI opt-out, as a FHIR Consent in the EHR (the test bed)."""
    consent = json.loads(AI_OPT_OUT.read_text(encoding="utf-8"))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": consent, "request": {"method": "PUT", "url": f"Consent/{consent['id']}"}}],
    }
    fhir.load([("consent", json.dumps(bundle))])


async def consent_scene(url: str, clinician_key: str, auditor_key: str) -> None:
    print(
        f"\n{BOLD}Scene: a patient's consent{RESET}: {CONSENT_PATIENT} has opted out of processing by AI agents"
    )
    async with agent(url, clinician_key) as clinician:
        args = {"patient_id": CONSENT_PATIENT, "purpose": "treatment"}
        err = show(
            "clinician agent", "search_conditions", args, await clinician.call_tool("search_conditions", args)
        )
        expect(
            err.get("reasons") == ["CONSENT_DENIED"],
            "the patient's AI opt-out should deny the clinician agent",
        )
    async with agent(url, auditor_key) as auditor:
        args = {"patient_id": CONSENT_PATIENT, "purpose": "audit"}
        result = await auditor.call_tool("audit_disclosures", args)
        print(
            f"\n{BOLD}auditor agent{RESET} → audit_disclosures(patient_id={CONSENT_PATIENT!r}, purpose='audit')"
        )
        expect(not result.is_error, "the auditor should get the accounting of disclosures")
        if result.is_error:
            return
        report = (result.structured_content or {}).get("report", {})
        summary = report.get("summary", {})
        print(
            f"  {GREEN}ALLOWED{RESET} trail verified={report.get('trail', {}).get('verified')} · "
            f"{summary.get('accesses')} accesses, {summary.get('denied')} denied attempts"
        )
        for attempt in report.get("denied", []):
            print(
                f"  {DIM}denied: {attempt.get('ts')} {attempt.get('agent')} {attempt.get('tool')} "
                f"{attempt.get('reason_codes')}{RESET}"
            )
        expect(
            any(a.get("agent") == CLINICIAN["id"] for a in report.get("denied", [])),
            "the accounting should list the clinician agent's denied attempt",
        )


async def session(url: str, nurse_key: str, clinician_key: str) -> None:
    async with agent(url, nurse_key) as nurse:
        tools = sorted(t.name for t in (await nurse.list_tools()).tools)
        print(f"\n{BOLD}nurse agent{RESET} sees {len(tools)} tools: {', '.join(tools)}")
        expect("search_medication_statements" not in tools, "the nurse should not see medication tools")
        args = {
            "patient_id": data.SERIES_PATIENT_ID,
            "purpose": "treatment",
            "category": "laboratory",
            "page_size": 5,
        }
        body = show(
            "nurse agent", "search_observations", args, await nurse.call_tool("search_observations", args)
        )
        expect(body.get("count", 0) > 0, "the nurse should read lab observations")
        args = {"patient_id": data.SERIES_PATIENT_ID, "purpose": "treatment"}
        err = show(
            "nurse agent",
            "search_medication_statements",
            args,
            await nurse.call_tool("search_medication_statements", args),
        )
        expect(err.get("code") == "policy_denied", "the nurse should be denied medications")

    async with agent(url, clinician_key) as clinician:
        args = {"patient_id": data.AU_PATIENT_ID, "purpose": "discharge_summary"}
        body = show(
            "clinician agent", "list_documents", args, await clinician.call_tool("list_documents", args)
        )
        ids = {r["id"] for r in body.get("resources", [])}
        expect(data.PSY_NOTE_ID not in ids, "the psychiatric note should be withheld for a discharge summary")
        args = {
            **args,
            "purpose": "treatment",
            "break_glass_reason": "Patient deteriorating; need full history now.",
        }
        body = show(
            "clinician agent", "list_documents", args, await clinician.call_tool("list_documents", args)
        )
        ids = {r["id"] for r in body.get("resources", [])}
        expect(data.PSY_NOTE_ID in ids, "break-glass should release the psychiatric note")


def print_audit(path: Path) -> None:
    print(f"\n{BOLD}Audit trail{RESET} ({path.name}, hash-chained, fsynced before each result left):")
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        rec = entry.get("record")
        if not rec:
            continue
        mark = GREEN if rec["result"] == "allowed" else RED
        print(
            f"  #{entry['seq']:<3} {rec['ts']} {rec['kind']:<12} {rec.get('subject_id') or '-':<16} "
            f"{rec.get('tool') or '-':<30} {mark}{rec['result']:<8}{RESET} "
            f"{','.join(rec.get('reason_codes') or []) or '-':<24} alerts={','.join(rec.get('alerts') or []) or '-'} "
            f"decision={str(rec.get('decision_id'))[:8]}… prev={entry['prev'][:8]}…"
        )


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mcp-fhir-demo-"))
    nurse_key, nurse_hash = generate_api_key()
    clinician_key, clinician_hash = generate_api_key()
    auditor_key, auditor_hash = generate_api_key()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"{BOLD}mcp-fhir demo{RESET}: starting the FHIR test bed …")
    with start_fhir_server() as fhir:
        keys = [
            api_key_entry(NURSE, nurse_hash),
            api_key_entry(CLINICIAN, clinician_hash),
            api_key_entry(AUDITOR, auditor_hash),
        ]
        consent = {"enabled": True, "source": "ehr"}  # the patient's Consent resources, read from the EHR
        config_path = http_config(workdir, fhir.base_url, port, keys, consent=consent)
        load_consent(fhir)
        print(f"  FHIR R4 server at {fhir.base_url}")
        print(f"  starting `mcp-fhir serve` (with its own OPA child) at {url}/mcp")
        with SidecarProcess(config_path, url=url):
            asyncio.run(session(url, nurse_key, clinician_key))
            asyncio.run(consent_scene(url, clinician_key, auditor_key))
    audit = workdir / "audit.jsonl"
    print_audit(audit)
    verify = subprocess.run(
        [str(REPO / ".venv/bin/mcp-fhir"), "audit", "verify", "--config", str(config_path)],
        capture_output=True,
        text=True,
    )
    print(f"\n{BOLD}mcp-fhir audit verify{RESET}: {verify.stdout.strip() or verify.stderr.strip()}")
    expect(verify.returncode == 0, "the audit chain should verify")
    if failures:
        print(f"\n{RED}demo FAILED: {len(failures)} unexpected outcome(s){RESET}")
        return 1
    print(f"\n{GREEN}demo OK{RESET} (files in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
