"""One request id per HTTP request, across logs and audit (#19 §5): a call refused for bad arguments, an
allowed call and an authentication rejection each carry the id the HTTP request was given (and echoed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests.integration.test_surface_http import (
    INITIALIZE,
    MCP_HEADERS,
    READ_ARGS,
    HttpSidecar,
    audit_records,
    mcp_client,
    start_http_sidecar,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, fhir_server: Any) -> Iterator[HttpSidecar]:
    thread, running = start_http_sidecar(tmp_path_factory.mktemp("request-ids"), fhir_server.base_url)
    with thread:
        yield running


async def test_a_call_refused_for_bad_arguments_is_audited_under_the_http_requests_id(sidecar: HttpSidecar):
    headers = {**sidecar.headers("nurse"), "X-Request-Id": "req-bad-args-0001"}
    async with mcp_client(sidecar.url, headers) as client:
        result = await client.call_tool("read_patient", {**READ_ARGS, "patient_id": "../etc"})
    assert result.is_error
    [record] = [
        r for r in audit_records(sidecar.audit_path, "access") if r["request_id"] == "req-bad-args-0001"
    ]
    assert (record["result"], record["error_code"], record["tool"]) == (
        "error",
        "invalid_argument",
        "read_patient",
    )


async def test_an_allowed_call_and_its_decision_carry_the_http_requests_id(sidecar: HttpSidecar):
    headers = {**sidecar.headers("nurse"), "X-Request-Id": "req-allowed-0002"}
    async with mcp_client(sidecar.url, headers) as client:
        result = await client.call_tool("read_patient", READ_ARGS)
    assert not result.is_error
    [record] = [
        r for r in audit_records(sidecar.audit_path, "access") if r["request_id"] == "req-allowed-0002"
    ]
    assert record["result"] == "allowed"
    assert record["decision_input"]["context"]["request_id"] == "req-allowed-0002"


async def test_an_authentication_rejection_is_audited_under_the_id_the_response_echoes(sidecar: HttpSidecar):
    headers = {
        **MCP_HEADERS,
        "Authorization": "Bearer mfk_not_a_real_key_at_all",
        "X-Request-Id": "req-reject-0003",
    }
    async with httpx2.AsyncClient(timeout=30.0) as http:
        response = await http.post(sidecar.url, json=INITIALIZE, headers=headers)
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "req-reject-0003"
    records = [
        r for r in audit_records(sidecar.audit_path, "auth_failure") if r["request_id"] == "req-reject-0003"
    ]
    assert [r["result"] for r in records] == ["denied"]
