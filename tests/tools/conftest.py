"""A call-path harness over the in-package fakes: no OPA, EHR, database or network.

`Harness` holds a `FakePolicyEngine`, a `FakeEHRClient`, a `FakeAuditTrail` (which can fail or be
held open), and the `AppContext` over them. `harness.run(tool_name, **arguments)` runs one call
through `CallPath.run`, as the server does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
from mcp.types import CallToolResult

from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.fake import FakeAuditTrail
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.context import AppContext, IdentityIds
from mcp_fhir.ehr.client import FakeEHRClient
from mcp_fhir.policy.decide import Decider
from mcp_fhir.policy.engine import Decision, FakePolicyEngine, Obligations
from mcp_fhir.tools import CallPath, Tool, all_tools

PATIENT: Final = "pat-1"
OTHER_PATIENT: Final = "pat-2"
SUBJECT: Final = Subject(id="agent-1", authn="local", claims={"roles": ["r"]}, scopes=("s",))
KEY: Final = b"k" * 32
DEADLINE_S: Final = 5.0


def allow_with(obligations: Obligations | None = None, decision_id: str = "d-allow") -> Decision:
    return Decision(allow=True, obligations=obligations or Obligations(), decision_id=decision_id)


def deny_with(*codes: str, decision_id: str = "d-deny") -> Decision:
    return Decision(
        allow=False, reasons=tuple({"code": c, "message": ""} for c in codes), decision_id=decision_id
    )


@dataclass
class Harness:
    engine: FakePolicyEngine
    ehr: FakeEHRClient
    sink: FakeAuditTrail
    app: AppContext
    tools: dict[str, Tool] = field(default_factory=lambda: {t.name: t for t in all_tools()})

    def set_decision(self, decide: Callable[[Mapping[str, Any]], Decision]) -> None:
        self.engine.answer_with(decide)

    async def run(self, tool: str, **arguments: Any) -> CallToolResult:
        """One call of `tool`, through the whole call path."""
        return await CallPath(self.app).run(self.tools[tool], arguments)


def make_harness(
    decide: Callable[[Mapping[str, Any]], Decision] | None = None,
    *,
    resources: list[dict[str, Any]] | None = None,
    engine: Any = None,
    **app_overrides: Any,
) -> Harness:
    """A harness whose engine answers `decide` (allow by default), or is `engine` when given."""
    fake = FakePolicyEngine(decide or (lambda _i: allow_with()), visible=frozenset(CATALOGUE))
    ehr = FakeEHRClient(resources=list(resources or []))
    sink = FakeAuditTrail()
    shadow = app_overrides.pop("shadow_engine", None)
    decider = Decider(engine or fake, audit=sink.record, candidate=shadow)
    options: dict[str, Any] = {
        "idmap": IdentityIds(),
        "local_subject": SUBJECT,
        "continuation_key": KEY,
        "enabled_tools": frozenset(CATALOGUE),
        **app_overrides,
    }
    app = AppContext(decider=decider, backends={"fake": ehr}, default_backend="fake", audit=sink, **options)
    return Harness(fake, ehr, sink, app)


async def wait_until(condition: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    """Poll a real condition until it holds, failing at the deadline (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not condition():
        if loop.time() > end:
            pytest.fail("condition not reached before the deadline")
        await asyncio.sleep(0)


def observation(rid: str, patient: str = PATIENT, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "subject": {"reference": f"Patient/{patient}"}, **extra}


@pytest.fixture
def harness() -> Harness:
    return make_harness()
