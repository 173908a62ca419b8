"""Issue #11 (1), over the wire: a subset of the bypass matrix through `mcp-fhir`'s streamable HTTP app
(uvicorn on loopback), with API keys whose configured claims differ, driven by the official MCP client.

The API key's claims are configuration, so "crafting" them is what a careless administrator (or an
attacker who can edit the key list but not the policy) would do; the policy must read them as strictly
as it reads a JWT's claims. Each key's calls must be refused or return only permitted data, and every
call leaves an `access` record naming the key (`authn: api_key`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_fhir import config
from mcp_fhir.agent_auth.api_keys import generate_api_key
from mcp_fhir.http_app import build_http_app
from mcp_fhir.server import build_server
from tests.adversarial.conftest import attempt, audit_records, tool_error
from tests.testbed import data
from tests.testbed.issuer import ServerThread, bind_loopback
from tests.testbed.sidecar import sidecar_config

pytestmark = pytest.mark.integration

PID, OTHER = data.AU_PATIENT_ID, data.AU_DVA_PATIENT_ID
CLIENT_TIMEOUT = 30.0
KEYS: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {}


def _key(name: str, claims: dict[str, Any], scopes: list[str]) -> None:
    key, digest = generate_api_key()
    KEYS[name] = (key, digest, claims, scopes)


_key("nurse", {"roles": ["nurse"]}, ["user/Patient.rs", "user/Observation.rs"])
_key(
    "bound",
    {"roles": ["clinician"], "patient": PID, "purpose_of_use": "medication_reconciliation"},
    ["user/*.rs"],
)
_key("string-role", {"roles": "clinician"}, ["user/*.rs"])
_key("nested-role", {"roles": ["nurse"], "realm_access": {"roles": ["clinician"]}}, ["user/*.rs"])
_key("clinician", {"roles": ["clinician"]}, ["user/Observation.rs"])

# (key, tool, arguments, expected outcome: reason code that must be present, or "allowed")
HTTP_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "nurse",
        "search_medication_statements",
        {"patient_id": PID, "purpose": "treatment"},
        "ROLE_NOT_PERMITTED",
    ),
    (
        "nurse",
        "search_observations",
        {"patient_id": OTHER, "purpose": "treatment", "break_glass_reason": "emergency, unconscious patient"},
        "BREAK_GLASS_NOT_PERMITTED",
    ),
    ("nurse", "search_observations", {"patient_id": OTHER, "purpose": "treatment"}, "allowed"),
    ("bound", "read_patient", {"patient_id": OTHER}, "PATIENT_MISMATCH"),
    (
        "bound",
        "search_medication_statements",
        {"patient_id": PID, "purpose": "treatment"},
        "PURPOSE_MISMATCH",
    ),
    ("bound", "read_patient", {"patient_id": PID}, "allowed"),
    ("string-role", "read_patient", {"patient_id": PID, "purpose": "treatment"}, "NO_ROLE"),
    ("nested-role", "search_conditions", {"patient_id": PID, "purpose": "treatment"}, "ROLE_NOT_PERMITTED"),
    ("clinician", "search_conditions", {"patient_id": PID, "purpose": "treatment"}, "SCOPE_NOT_GRANTED"),
]


@asynccontextmanager
async def http_sidecar(workdir: Path, fhir_base_url: str, opa: str) -> AsyncIterator[str]:
    sock = bind_loopback()
    port = sock.getsockname()[1]
    cfg = sidecar_config(
        workdir, fhir_base_url, opa_url=opa, transport="http",
        server={"transport": "http", "host": "127.0.0.1", "port": port},
        auth={"local": None, "api_keys": [
            {"id": f"key-{name}", "hash": digest, "claims": claims, "scopes": scopes}
            for name, (_k, digest, claims, scopes) in KEYS.items()
        ]},
    )  # fmt: skip
    settings = config.from_mapping(cfg)
    server = build_server(settings)
    with ServerThread(build_http_app(settings, server), sock=sock):
        yield f"http://127.0.0.1:{port}{settings.server.path}"


@asynccontextmanager
async def client_for(url: str, key_name: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {KEYS[key_name][0]}"}
    async with httpx2.AsyncClient(headers=headers, timeout=CLIENT_TIMEOUT) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            yield client


async def test_api_keys_with_crafted_claims_are_refused_or_see_only_permitted_data_over_http(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    outcomes = []
    async with http_sidecar(tmp_path, fhir_server.base_url, opa_url) as url:
        for key_name, tool, args, expected in HTTP_CASES:
            async with client_for(url, key_name) as client:
                outcomes.append((key_name, args, expected, await attempt(client, tool, args)))
    records = audit_records(tmp_path)
    assert len(records) == len(HTTP_CASES)
    for (key_name, args, expected, result), record in zip(outcomes, records, strict=True):
        assert record["subject_id"] == f"key-{key_name}" and record["authn"] == "api_key"
        if expected == "allowed":
            assert not result.is_error, result.content[0].text
            for r in result.structured_content["resources"]:
                ref = (
                    r.get("subject", {}).get("reference")
                    if r["resourceType"] != "Patient"
                    else f"Patient/{r['id']}"
                )
                assert ref == f"Patient/{args['patient_id']}"
            assert data.HIV_OBSERVATION_ID not in {r["id"] for r in result.structured_content["resources"]}
            assert record["result"] == "allowed"
            continue
        err = tool_error(result)
        assert err["code"] == "policy_denied" and expected in err["reasons"], (key_name, err)
        assert record["result"] == "denied" and expected in record["reason_codes"]


async def test_an_unknown_or_tampered_api_key_gets_no_tools_and_is_audited_as_an_auth_failure(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    real = KEYS["nurse"][0]
    tampered = real[:-1] + ("A" if real[-1] != "A" else "B")
    async with http_sidecar(tmp_path, fhir_server.base_url, opa_url) as url:
        async with httpx2.AsyncClient(timeout=CLIENT_TIMEOUT) as http:
            response = await http.post(
                url,
                headers={
                    "Authorization": f"Bearer {tampered}",
                    "Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                },
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            )
    assert response.status_code == 401
    failures = audit_records(tmp_path, kind="auth_failure")
    assert [f["reason_codes"] for f in failures] == [["api_key_unknown"]]
    assert audit_records(tmp_path) == []
