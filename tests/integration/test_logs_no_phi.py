"""A full run's logs hold no PHI and no secret.

A real `mcp-fhir serve` (HTTP, DEBUG logging, SMART client_secret_basic to the test token endpoint in
front of the FHIR test bed, the managed OPA writing its decision log) is driven through allowed, denied
and erroring calls, including a rejected JWT and a rejected API key, and calls whose free-text arguments
carry PHI. Then its stderr and OPA's decision log are searched for every `KNOWN_PHI` string, every
patient id (OPA's log must mask them), and every secret: the API keys, the bearer JWT, the SMART client
secret and the SMART access tokens the token endpoint issued.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.integration._ops_harness import ApiKeyIdentity, ServedSidecar, http_config
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, NURSE
from tests.testbed.token_server import RegisteredClient, TokenServer, start_token_server

pytestmark = pytest.mark.integration

SMART_SECRET = "smart-secret-for-log-test-5d2a91"
SECRET_ENV = "MCP_FHIR_TEST_SMART_SECRET"
FORGED_JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZvcmdlZCJ9."
    "eyJzdWIiOiJtYWxsb3J5IiwiYXVkIjoiaHR0cDovLzEyNy4wLjAuMTo5L21jcCJ9."
    "bm90LWEtcmVhbC1zaWduYXR1cmUtYnV0LWxvbmctZW5vdWdo"
)
WRONG_API_KEY = "mfk_this-key-was-never-issued-0123456789abcdef"
PHI_TEXT = f"{data.KNOWN_PHI[8]} {data.KNOWN_PHI[9]}"  # a street line and a birth date


@pytest.fixture
def token_server(fhir_server) -> Iterator[TokenServer]:
    clients = [RegisteredClient("mcp-fhir-logs", secret=SMART_SECRET)]
    with start_token_server(clients, upstream_fhir_url=fhir_server.base_url) as server:
        yield server


@pytest.fixture
def identities() -> dict[str, ApiKeyIdentity]:
    return {"nurse": ApiKeyIdentity(NURSE), "clinician": ApiKeyIdentity(CLINICIAN)}


@pytest.fixture
def sidecar(tmp_path: Path, token_server: TokenServer, identities) -> Iterator[ServedSidecar]:
    cfg = http_config(tmp_path, token_server.fhir_base_url, list(identities.values()))
    cfg["backends"]["testbed"]["smart"] = {
        "client_id": "mcp-fhir-logs",
        "auth_method": "client_secret_basic",
        "token_url": token_server.token_url,
        "client_secret_env": SECRET_ENV,
    }
    with ServedSidecar(tmp_path, cfg, env={SECRET_ENV: SMART_SECRET}, log_level="DEBUG") as served:
        yield served


async def drive(sidecar: ServedSidecar, identities: dict[str, ApiKeyIdentity]) -> None:
    au = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
    async with sidecar.client(identities["nurse"].key) as nurse:
        assert not (await nurse.call_tool("read_patient", au)).is_error
        assert (await nurse.call_tool("search_medication_statements", au)).is_error  # denied
        assert (await nurse.call_tool("read_patient", {**au, "patient_id": "no-such-patient"})).is_error
        assert (await nurse.call_tool("read_patient", {**au, "purpose": PHI_TEXT})).is_error
    async with sidecar.client(identities["clinician"].key) as clinician:
        for tool in ("search_observations", "search_conditions", "list_documents", "patient_summary"):
            await clinician.call_tool(tool, au)
        await clinician.call_tool("read_document", {**au, "document_id": data.PSY_NOTE_ID})
        await clinician.call_tool(
            "read_document", {**au, "document_id": data.PSY_NOTE_ID, "break_glass_reason": PHI_TEXT}
        )
        await clinician.call_tool(
            "read_document",
            {
                "patient_id": data.AU_INJECTION_PATIENT_ID,
                "document_id": data.INJECTION_NOTE_ID,
                "purpose": "treatment",
            },
        )
        await clinician.call_tool(
            "create_clinical_note",
            {
                **au,
                "title": f"Review {PHI_TEXT}",
                "text": f"Seen at {PHI_TEXT}.",
                "idempotency_key": "log-test-0001",
            },
        )
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    for credential in (FORGED_JWT, WRONG_API_KEY):
        response = httpx2.post(
            sidecar.mcp_url,
            json=body,
            headers={**headers, "Authorization": f"Bearer {credential}"},
            timeout=10,
        )
        assert response.status_code == 401


async def test_a_full_runs_logs_and_opa_decision_log_hold_no_phi_and_no_secrets(
    sidecar: ServedSidecar, identities, token_server: TokenServer, tmp_path: Path
):
    await drive(sidecar, identities)
    sidecar.stop()  # flush everything the process had to say
    stderr = sidecar.stderr()
    decision_log = (tmp_path / "opa-decisions.log").read_text(encoding="utf-8")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "the sidecar wrote no log lines"
    assert all(json.loads(line)["level"] for line in lines), "every stderr line is a JSON log record"
    assert any(json.loads(line).get("request_id") for line in lines)
    assert '"decision_id"' in decision_log, "OPA's decision log was not written"

    secrets = [identities["nurse"].key, identities["clinician"].key, FORGED_JWT, WRONG_API_KEY, SMART_SECRET]
    secrets += token_server.issued_tokens()
    assert len(secrets) > 5, "the SMART token endpoint issued no token"
    for name, text in (("sidecar stderr", stderr), ("OPA decision log", decision_log)):
        for phi in data.KNOWN_PHI:
            assert phi not in text, f"{name} holds PHI"
        for secret in secrets:
            assert secret not in text, f"{name} holds a secret"
    for patient in data.PATIENTS:
        assert patient not in decision_log, "OPA's decision log must mask the patient id"
