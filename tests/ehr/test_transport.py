"""The pooled transport: fhirpy's queries go over one keep-alive session, and HTTP failures are translated."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from mcp_fhir._exceptions import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from mcp_fhir.ehr.client import FhirEHRClient
from mcp_fhir.ehr.transport import AiohttpEhrHttp, build_http_client, send
from tests.testbed import data
from tests.testbed.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration


async def test_many_fhirpy_requests_share_one_reused_connection(fhir_server):
    origin = fhir_server.base_url.rsplit("/fhir/", 1)[0]
    async with FaultProxy(origin) as proxy:
        client = FhirEHRClient("testbed", proxy.url + "/fhir/R4", http=build_http_client())
        try:
            for _ in range(20):
                result = await client.read("Patient", data.AU_PATIENT_ID, patient=data.AU_PATIENT_ID)
                assert result.resources[0]["id"] == data.AU_PATIENT_ID
        finally:
            await client.close()
    assert proxy.requests_forwarded == 20
    assert proxy.connections_accepted == 1


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.status(500), "upstream_unavailable"),
        (Fault.status(404), "resource_not_found"),
        (Fault.status(401), "upstream_auth_failed"),
        (Fault.status(429, headers={"Retry-After": "1"}), "upstream_rate_limited"),
        (Fault.garbage(), "upstream_bad_response"),
        (Fault.reset(), "upstream_unavailable"),
        (Fault.json({"resourceType": "Observation"}), "upstream_bad_response"),
    ],
)
async def test_each_upstream_failure_becomes_one_typed_error(fhir_server, fault, code):
    origin = fhir_server.base_url.rsplit("/fhir/", 1)[0]
    async with FaultProxy(origin) as proxy:
        proxy.set_fault(fault)
        client = FhirEHRClient("testbed", proxy.url + "/fhir/R4", http=build_http_client())
        try:
            with pytest.raises(Exception) as err:
                await client.read("Patient", data.AU_PATIENT_ID, patient=data.AU_PATIENT_ID)
        finally:
            await client.close()
    assert getattr(err.value, "code", None) == code


@asynccontextmanager
async def _through_proxy(
    fhir_server: Any, fault: Fault | None = None, times: int | None = None, **client: Any
) -> AsyncIterator[tuple[FaultProxy, AiohttpEhrHttp]]:
    """The test bed behind a fault proxy (misbehaving as told), and a pooled client to reach it."""
    origin = fhir_server.base_url.rsplit("/fhir/", 1)[0]
    async with FaultProxy(origin) as proxy:
        if fault is not None:
            proxy.set_fault(fault, times=times)
        http = build_http_client(**client)
        try:
            yield proxy, http
        finally:
            await http.aclose()


async def test_an_answer_slower_than_the_read_timeout_is_upstream_timeout(fhir_server):
    async with _through_proxy(fhir_server, Fault.latency(2.0), read_timeout=0.2) as (proxy, http):
        with pytest.raises(UpstreamTimeout) as caught:
            await send(http, "GET", f"{proxy.url}/fhir/R4/metadata")
    assert caught.value.code == "upstream_timeout"


async def test_a_body_trickled_past_the_total_timeout_is_upstream_timeout_in_time(fhir_server):
    trickle = Fault.trickle(every=0.1, bytes=1)  # each read well inside read_timeout; the body takes minutes
    async with _through_proxy(fhir_server, trickle, read_timeout=1.0, total_timeout=0.5) as (proxy, http):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout) as caught:
            await send(http, "GET", f"{proxy.url}/fhir/R4/Patient/{data.AU_PATIENT_ID}")
        elapsed = loop.time() - started
    assert caught.value.code == "upstream_timeout"
    assert elapsed < 0.5 + 1.0  # the deadline, plus scheduling slack on a shared machine


async def test_a_503_keeps_its_retry_after_for_the_guard(fhir_server):
    fault = Fault.status(503, headers={"Retry-After": "7"})
    async with _through_proxy(fhir_server, fault) as (proxy, http):
        with pytest.raises(UpstreamUnavailable) as caught:
            await send(http, "GET", f"{proxy.url}/fhir/R4/metadata")
    assert caught.value.details["status"] == 503
    assert caught.value.retry_after == "7"


async def test_a_body_over_the_size_limit_is_refused_not_parsed(fhir_server):
    big = {"resourceType": "Patient", "id": "x", "text": {"div": "x" * 5000}}
    async with _through_proxy(fhir_server, Fault.json(big)) as (proxy, http):
        with pytest.raises(UpstreamBadResponse) as caught:
            await send(http, "GET", f"{proxy.url}/fhir/R4/Patient/x", max_body=1000)
        small = await send(http, "GET", f"{proxy.url}/fhir/R4/Patient/x", max_body=100_000)
    assert caught.value.code == "upstream_bad_response"
    assert small.body == big


async def test_a_chunked_body_without_a_length_is_cut_off_at_the_size_limit():
    chunk = b'"' + b"x" * 598 + b'"'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for part in (b"[", chunk, b",", chunk, b",", chunk, b"]"):
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = build_http_client()
    try:
        with pytest.raises(UpstreamBadResponse) as caught:
            await send(http, "GET", f"http://127.0.0.1:{port}/fhir/Patient/x", max_body=1000)
        whole = await send(http, "GET", f"http://127.0.0.1:{port}/fhir/Patient/x", max_body=10_000)
    finally:
        await http.aclose()
        server.close()
        await server.wait_closed()
    assert caught.value.code == "upstream_bad_response"
    assert len(whole.body) == 3


async def test_a_truncated_body_is_upstream_unavailable(fhir_server):
    async with _through_proxy(fhir_server, Fault.truncate(bytes=20)) as (proxy, http):
        with pytest.raises(UpstreamUnavailable) as caught:
            await send(http, "GET", f"{proxy.url}/fhir/R4/Patient/{data.AU_PATIENT_ID}")
    assert caught.value.code == "upstream_unavailable"


async def test_a_redirect_is_returned_not_followed(fhir_server):
    async with _through_proxy(fhir_server) as (proxy, http):
        proxy.set_fault(Fault.status(302, headers={"Location": f"{proxy.url}/fhir/R4/metadata"}), times=1)
        response = await send(http, "GET", f"{proxy.url}/fhir/R4/Patient/{data.AU_PATIENT_ID}")
        seen = proxy.requests_seen
    assert response.status == 302
    assert seen == 1


async def test_proxy_variables_in_the_environment_are_ignored(fhir_server, monkeypatch):
    async with _through_proxy(fhir_server) as (proxy, http):
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        response = await send(http, "GET", f"{fhir_server.base_url}/Patient/{data.AU_PATIENT_ID}")
        seen = proxy.requests_seen
    assert response.status == 200
    assert seen == 0
