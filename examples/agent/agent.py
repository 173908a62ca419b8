"""A small agent that proves the sidecar's contract: list tools, call them as two identities, print decisions.

    MCP_FHIR_NURSE_KEY=mfk_... MCP_FHIR_CLINICIAN_KEY=mfk_... \
        python examples/agent/agent.py --url http://127.0.0.1:8765/mcp --patient pat-au-001

It connects with the official MCP Python client over streamable HTTP, once per identity (each presents
its own API key as a bearer token), lists the tools the policy lets that identity see, calls a fixed
plan of tools, and prints each decision: allowed (with the decision id) or denied (with the reason codes
and the decision id). It exits 0 when every outcome is the one the plan expects, 1 when any is not, and
2 when it cannot connect. The plan fits the policy in policies/ and the synthetic test bed; adapt
EXPECTATIONS for yours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

DEFAULT_URL = "http://127.0.0.1:8765/mcp"
DEFAULT_PATIENT = "pat-au-001"
DEFAULT_TIMEOUT = 30.0
KEY_ENV = {"nurse": "MCP_FHIR_NURSE_KEY", "clinician": "MCP_FHIR_CLINICIAN_KEY"}


@dataclass(frozen=True)
class Expectation:
    identity: str
    tool: str
    outcome: str  # "allowed" or the error code, e.g. "policy_denied"


EXPECTATIONS = (
    Expectation("nurse", "read_patient", "allowed"),
    Expectation("nurse", "search_observations", "allowed"),
    Expectation("nurse", "search_medication_statements", "policy_denied"),
    Expectation("clinician", "read_patient", "allowed"),
    Expectation("clinician", "search_medication_statements", "allowed"),
    Expectation("clinician", "search_conditions", "allowed"),
)


def outcome_of(result: Any) -> tuple[str, str]:
    """('allowed', decision id) or (error code, reasons and decision id)."""
    if not result.is_error:
        provenance = (result.structured_content or {}).get("provenance") or {}
        return "allowed", f"decision {provenance.get('decision_id')}"
    try:
        error = json.loads(result.content[0].text)
    except (ValueError, IndexError, AttributeError):
        return "unreadable_error", ""
    return str(error.get("code")), f"reasons {error.get('reasons')} decision {error.get('decision_id')}"


async def run_identity(url: str, key: str, identity: str, patient: str, purpose: str) -> list[str]:
    """Run this identity's part of the plan; return the unexpected outcomes."""
    problems: list[str] = []
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=DEFAULT_TIMEOUT)
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        listed = await client.list_tools()
        visible = sorted(t.name for t in listed.tools)
        print(f"\n[{identity}] sees {len(visible)} tools: {', '.join(visible)}")
        for step in (e for e in EXPECTATIONS if e.identity == identity):
            result = await client.call_tool(step.tool, {"patient_id": patient, "purpose": purpose})
            outcome, detail = outcome_of(result)
            mark = "ok " if outcome == step.outcome else "!! "
            print(f"  {mark}{step.tool:32} {outcome:16} {detail}")
            if outcome != step.outcome:
                problems.append(f"{identity} {step.tool}: expected {step.outcome}, got {outcome}")
    return problems


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("MCP_FHIR_URL", DEFAULT_URL))
    parser.add_argument("--patient", default=DEFAULT_PATIENT)
    parser.add_argument("--purpose", default="treatment")
    args = parser.parse_args(argv)
    keys = {identity: os.environ.get(env) for identity, env in KEY_ENV.items()}
    missing = [KEY_ENV[i] for i, k in keys.items() if not k]
    if missing:
        print(f"set {', '.join(missing)} to the identities' API keys", file=sys.stderr)
        return 2
    problems: list[str] = []
    try:
        for identity, key in keys.items():
            problems += await run_identity(args.url, str(key), identity, args.patient, args.purpose)
    except (httpx2.HTTPError, OSError) as exc:
        print(f"cannot reach {args.url}: {type(exc).__name__}", file=sys.stderr)
        return 2
    if problems:
        print("\nUNEXPECTED:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nall {len(EXPECTATIONS)} decisions as expected")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
