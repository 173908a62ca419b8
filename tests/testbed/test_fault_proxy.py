from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import httpx2
import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.testbed` is not importable under --import-mode=importlib otherwise
    sys.path.insert(0, _ROOT)

from tests.testbed.fault_proxy import EchoServer, Fault, FaultProxy  # noqa: E402


@pytest.fixture(scope="module")
def upstream():
    with EchoServer() as server:
        yield server


@pytest.fixture
def proxy(upstream):
    with FaultProxy(upstream=upstream.url) as p:
        yield p


def test_pass_through_preserves_method_path_query_headers_and_body(proxy):
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        response = client.post(
            "/fhir/Observation/_search?patient=Patient%2F1&code=a,b&code=c",
            content=b'{"x": 1}',
            headers={"X-Trace": "abc", "Authorization": "Bearer t", "Content-Type": "application/fhir+json"},
        )
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "POST"
    assert echo["raw_path"] == "/fhir/Observation/_search?patient=Patient%2F1&code=a,b&code=c"
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["x-trace"] == "abc"
    assert headers["authorization"] == "Bearer t"
    assert headers["content-type"] == "application/fhir+json"
    assert echo["body"] == '{"x": 1}'
    assert (proxy.requests_seen, proxy.requests_forwarded) == (1, 1)


def test_keep_alive_connections_carry_many_requests(proxy):
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        for i in range(5):
            assert client.get(f"/n/{i}").json()["path"] == f"/n/{i}"
    assert proxy.requests_forwarded == 5
    assert proxy.connections_accepted == 1


def test_chunked_request_and_response_bodies_are_reframed(proxy):
    def parts():
        yield b"ab"
        yield b"cd"

    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        assert client.post("/echo", content=parts()).json()["body"] == "abcd"
        assert client.get("/chunked").content == b"one,two,three"
        assert len(client.get("/bytes/200000").content) == 200000


def test_status_fault_answers_without_forwarding(proxy):
    proxy.set_fault(Fault.status(500))
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        for _ in range(3):
            response = client.get("/fhir/Patient/1")
            assert response.status_code == 500
            assert response.json()["resourceType"] == "OperationOutcome"
    assert proxy.requests_seen == 3
    assert proxy.requests_forwarded == 0


def test_fault_applies_to_the_next_n_requests_then_passes_through(proxy):
    proxy.set_fault(Fault.status(429, headers={"Retry-After": "1"}), times=2)
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        first, second, third = (client.get("/x") for _ in range(3))
    assert first.status_code == second.status_code == 429
    assert first.headers["retry-after"] == "1"
    assert third.status_code == 200
    assert proxy.requests_forwarded == 1


def test_clear_restores_pass_through(proxy):
    proxy.set_fault(Fault.status(401))
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        assert client.get("/x").status_code == 401
        proxy.clear()
        assert client.get("/x").status_code == 200


def test_latency_fault_delays_then_forwards(proxy):
    proxy.set_fault(Fault.latency(0.3), times=1)
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        started = time.monotonic()
        assert client.get("/slow").status_code == 200
        assert time.monotonic() - started >= 0.3
        with pytest.raises(httpx2.ReadTimeout):
            proxy.set_fault(Fault.latency(2.0), times=1)
            client.get("/slow", timeout=0.2)
    assert proxy.requests_forwarded == 1


def test_reset_fault_resets_the_connection(proxy):
    proxy.set_fault(Fault.reset(), times=1)
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        with pytest.raises((httpx2.ReadError, httpx2.RemoteProtocolError)):
            client.get("/x")
        assert client.get("/x").status_code == 200
    assert proxy.requests_forwarded == 1


def test_truncate_fault_cuts_the_body_short(proxy):
    proxy.set_fault(Fault.truncate(bytes=20), times=1)
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            client.get("/fhir/Patient/1")
    assert proxy.requests_forwarded == 1


def test_truncated_body_bytes_are_the_first_n_of_the_real_answer(proxy):
    proxy.set_fault(Fault.truncate(bytes=20), times=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 100" in head
    assert body == b"x" * 20


def test_garbage_fault_answers_200_with_a_body_that_is_not_json(proxy):
    proxy.set_fault(Fault.garbage())
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        response = client.get("/fhir/Patient/1")
    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert proxy.requests_forwarded == 0


def test_raw_garbage_fault_is_not_http_at_all(proxy):
    proxy.set_fault(Fault.garbage(raw=True))
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            client.get("/x")


def test_json_fault_answers_a_fixed_document(proxy):
    proxy.set_fault(Fault.json({"result": {"allow": "yes"}}))
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        response = client.post("/v1/data/mcp_fhir/authz/decision", json={"input": {}})
    assert response.status_code == 200
    assert response.json() == {"result": {"allow": "yes"}}
    assert proxy.requests_forwarded == 0


def test_down_fault_refuses_connections_until_cleared(proxy):
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        assert client.get("/x").status_code == 200
        proxy.set_fault(Fault.down())
        with pytest.raises((httpx2.ConnectError, httpx2.ReadError, httpx2.RemoteProtocolError)):
            client.get("/x")
        with pytest.raises(httpx2.ConnectError):
            client.get("/x")
        proxy.clear()
        assert client.get("/x").status_code == 200


def test_an_unreachable_upstream_is_a_502():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with FaultProxy(upstream=f"http://127.0.0.1:{port}") as proxy:
        with httpx2.Client(base_url=proxy.url, timeout=5) as client:
            assert client.get("/x").status_code == 502


async def test_the_proxy_works_as_an_async_context_manager(upstream):
    async with FaultProxy(upstream=upstream.url) as proxy:
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=5) as client:
            proxy.set_fault(Fault.status(503), times=1)
            assert (await client.get("/a")).status_code == 503
            assert (await client.get("/a")).status_code == 200


def test_trickle_fault_sends_the_whole_body_a_few_bytes_at_a_time(proxy):
    proxy.set_fault(Fault.trickle(every=0.05, bytes=4), times=1)
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        started = time.monotonic()
        response = client.get("/bytes/20")
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.content == b"x" * 20
    assert elapsed >= 5 * 0.05  # five pieces of four bytes, each after its interval


def test_request_times_record_when_each_request_arrived(proxy):
    before = time.monotonic()
    with httpx2.Client(base_url=proxy.url, timeout=5) as client:
        client.get("/a")
        client.get("/b")
    assert len(proxy.request_times) == 2
    assert before <= proxy.request_times[0] <= proxy.request_times[1] <= time.monotonic()
