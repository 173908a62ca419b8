"""Shadow mode costs no latency (#19 §4): the real OPA decides; a slow or dead candidate on loopback never
holds the response, and a candidate that misses its timeout is counted and audited as `shadow_timeout`.

The slow candidate is an HTTP server that holds every decision request until the test releases it;
the dead one is a listening socket that never accepts. Neither is waited on by a sleep: the tests
check the order of events (the answer left while the candidate still held the request) and poll
the audit trail with a bound.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from mcp import Client

from mcp_fhir import config, metrics
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, TEST_DECISION_TIMEOUT, sidecar_config

pytestmark = pytest.mark.integration

SHADOW_TIMEOUT_S = 1.0  # the candidate's own timeout (the configured decision timeout)
POLL_DEADLINE_S = 15.0
ARGS = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}


class HeldCandidate:
    """A candidate OPA that holds each decision request until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0
        self.answered = 0

    async def decide(self, request: web.Request) -> web.Response:
        self.holding += 1
        await self.release.wait()
        self.holding -= 1
        self.answered += 1
        return web.json_response({"result": {"allow": False, "reasons": [{"code": "CANDIDATE_NO"}]}})


@pytest.fixture
async def held_candidate() -> AsyncIterator[tuple[HeldCandidate, str]]:
    candidate = HeldCandidate()
    app = web.Application()
    app.router.add_post("/v1/data/mcp_fhir/authz/decision", candidate.decide)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    try:
        yield candidate, f"http://127.0.0.1:{port}"
    finally:
        candidate.release.set()
        await runner.cleanup()


@pytest.fixture
def dead_candidate() -> Any:
    """A loopback port that listens (so connecting succeeds) but never accepts or answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["record"] for line in lines if "record" in line]


async def _wait_for_shadow_record(path: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + POLL_DEADLINE_S
    while True:
        found = [r for r in _records(path) if r["kind"] == "shadow_divergence"]
        if found:
            return found[0]
        if loop.time() > end:
            pytest.fail("no shadow record before the deadline")
        await asyncio.sleep(0.05)


def _timeouts() -> float:
    return (
        metrics.REGISTRY.get_sample_value("mcp_fhir_shadow_divergences_total", {"kind": "shadow_timeout"})
        or 0.0
    )


def _settings(tmp_path: Path, fhir_server: Any, shadow_url: str, timeout: float = SHADOW_TIMEOUT_S) -> Any:
    cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN)
    cfg["opa"] = {**cfg["opa"], "shadow_url": shadow_url, "decision_timeout": timeout}
    return config.from_mapping(cfg)


async def test_a_slow_candidate_never_holds_the_answer_and_its_timeout_is_audited(
    tmp_path: Path, fhir_server: Any, held_candidate: tuple[HeldCandidate, str]
):
    candidate, url = held_candidate
    before = _timeouts()
    async with Client(build_server(_settings(tmp_path, fhir_server, url))) as client:
        result = await client.call_tool("read_patient", ARGS)
        # The answer is here while the candidate still holds its request: the call did not wait for it.
        assert not result.is_error, result.content[0].text
        assert (candidate.holding, candidate.answered) == (1, 0)
        record = await _wait_for_shadow_record(tmp_path / "audit.jsonl")
    assert record["extra"]["divergence"] == "shadow_timeout"
    [access] = [r for r in _records(tmp_path / "audit.jsonl") if r["kind"] == "access"]
    assert (access["result"], record["request_id"]) == ("allowed", access["request_id"])
    assert _timeouts() == before + 1


async def test_a_dead_candidate_never_holds_the_answer_and_its_timeout_is_audited(
    tmp_path: Path, fhir_server: Any, dead_candidate: str
):
    before = _timeouts()
    async with Client(build_server(_settings(tmp_path, fhir_server, dead_candidate))) as client:
        result = await client.call_tool("read_patient", ARGS)
        assert not result.is_error, result.content[0].text
        [access] = [r for r in _records(tmp_path / "audit.jsonl") if r["kind"] == "access"]
        assert access["result"] == "allowed"  # written before the candidate could have answered
        record = await _wait_for_shadow_record(tmp_path / "audit.jsonl")
    assert record["extra"]["divergence"] == "shadow_timeout"
    assert _timeouts() == before + 1


async def test_a_candidate_that_answers_late_but_in_time_is_still_compared(
    tmp_path: Path, fhir_server: Any, held_candidate: tuple[HeldCandidate, str]
):
    candidate, url = held_candidate
    settings = _settings(tmp_path, fhir_server, url, timeout=TEST_DECISION_TIMEOUT)
    async with Client(build_server(settings)) as client:
        result = await client.call_tool("read_patient", ARGS)
        assert not result.is_error
        assert candidate.holding == 1
        candidate.release.set()  # now it answers (a deny), after the response left
        record = await _wait_for_shadow_record(tmp_path / "audit.jsonl")
    assert record["extra"]["divergence"] == "narrowing"
    assert record["extra"]["candidate"]["reasons"] == ["CANDIDATE_NO"]
