"""Where a decision's bundle revision comes from: OPA's status API at start and on change, never
`?provenance=true` on the hot path while the status API answers; provenance while it does not.

A real OPA serving a bundle for the first; for the switch-over, a scripted OPA on loopback (aiohttp's
server) whose status API can be turned on and whose revision can change, and which records every query.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings
from tests.testbed.sidecar import POLICIES

CORPUS = POLICIES / "fixtures" / "decisions.json"
DEADLINE_S = 5.0


def _case(allow: bool) -> dict[str, Any]:
    cases = json.loads(CORPUS.read_text(encoding="utf-8"))
    return next(c for c in cases if c["expect"]["allow"] is allow and isinstance(c["input"], dict))


@pytest.mark.integration
async def test_a_bundles_revision_comes_from_the_status_api_as_provenance_would_give_it(
    opa_binary: str, tmp_path: Path
):
    bundle = tmp_path / "bundle"
    shutil.copytree(POLICIES, bundle, ignore=shutil.ignore_patterns("fixtures", "*_test.rego"))
    (bundle / ".manifest").write_text(json.dumps({"revision": "rev-test-1"}), encoding="utf-8")
    async with ManagedOpa([bundle], binary=opa_binary, extra_args=["--bundle"]) as opa:
        for source in ("status", "provenance"):
            settings = OpaSettings(url=opa.url, revision_from=source)  # type: ignore[arg-type]
            async with OpaPolicyEngine(settings) as engine:
                decision = await engine.evaluate(_case(allow=True)["input"])
                assert (source, decision.allow, decision.revision) == (source, True, "rev-test-1")
                assert engine.current_revision == "rev-test-1"


@dataclass
class ScriptedOpa:
    status_on: bool = False
    revision: str = "rev-1"
    queries: list[str] = field(default_factory=list)

    async def decision(self, request: web.Request) -> web.Response:
        self.queries.append(request.query_string)
        body: dict[str, Any] = {"result": {"allow": False, "reasons": [{"code": "X"}]}, "decision_id": "d"}
        if request.query.get("provenance") == "true":
            body["provenance"] = {"bundles": {"main": {"revision": self.revision}}}
        return web.json_response(body)

    async def status(self, request: web.Request) -> web.Response:
        if not self.status_on:
            return web.json_response(
                {"code": "internal_error", "message": "status plugin not enabled"}, status=500
            )
        return web.json_response({"result": {"bundles": {"main": {"active_revision": self.revision}}}})


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedOpa, str]]:
    opa = ScriptedOpa()
    app = web.Application()
    app.router.add_post("/v1/data/mcp_fhir/authz/decision", opa.decision)
    app.router.add_get("/v1/status", opa.status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield opa, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _until(engine: OpaPolicyEngine, opa: ScriptedOpa, want: str) -> None:
    """Ask decisions until one carries `want` (the background status check runs meanwhile), bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    while (await engine.evaluate({})).revision != want:
        if loop.time() > end:
            pytest.fail(f"the revision never became {want}")
        await asyncio.sleep(0)


async def _until_asked_plainly(engine: OpaPolicyEngine, opa: ScriptedOpa) -> None:
    """Ask decisions until one goes without `?provenance=true` (the status check has answered), bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    await engine.evaluate({})
    while opa.queries[-1] != "":
        if loop.time() > end:
            pytest.fail("decisions kept asking for provenance")
        await engine.evaluate({})
        await asyncio.sleep(0)


async def test_without_a_status_api_each_decision_asks_for_its_provenance(scripted: tuple[ScriptedOpa, str]):
    opa, url = scripted
    async with OpaPolicyEngine(OpaSettings(url=url, revision_poll_s=3600)) as engine:
        decision = await engine.evaluate({})
    assert decision.revision == "rev-1"
    assert opa.queries == ["provenance=true"]


async def test_once_the_status_api_answers_no_decision_asks_for_provenance_and_a_new_revision_shows(
    scripted: tuple[ScriptedOpa, str],
):
    opa, url = scripted
    async with OpaPolicyEngine(OpaSettings(url=url, revision_poll_s=0.01)) as engine:
        await engine.evaluate({})
        opa.status_on = True
        opa.revision = "rev-2"
        await _until(engine, opa, "rev-2")
        await _until_asked_plainly(engine, opa)
        opa.queries.clear()
        opa.revision = "rev-3"
        await _until(engine, opa, "rev-3")
    assert set(opa.queries) == {""}


async def test_with_the_status_api_on_at_start_no_decision_asks_for_provenance(
    scripted: tuple[ScriptedOpa, str],
):
    opa, url = scripted
    opa.status_on = True
    async with OpaPolicyEngine(OpaSettings(url=url, revision_poll_s=3600)) as engine:
        decisions = [await engine.evaluate({}) for _ in range(3)]
    assert [d.revision for d in decisions] == ["rev-1"] * 3
    assert opa.queries == ["", "", ""]


async def test_revision_from_provenance_asks_on_every_decision_and_never_reads_the_status_api(
    scripted: tuple[ScriptedOpa, str],
):
    opa, url = scripted
    opa.status_on = True
    async with OpaPolicyEngine(OpaSettings(url=url, revision_from="provenance")) as engine:
        await engine.evaluate({})
        await engine.evaluate({})
    assert opa.queries == ["provenance=true", "provenance=true"]
