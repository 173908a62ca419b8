"""A call-path harness over the in-package fakes: no OPA, EHR, database or network.

`Harness` holds a `FakePolicyEngine`, a `FakeEHRClient`, an in-memory audit sink that logs what
it wrote (and can fail or be held open), and the `AppContext` over them. `harness.ctx` is the
minimal stand-in for an MCP `Context` that the tool functions read their app from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final

import pytest

from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.context import AppContext, IdentityIds
from mcp_fhir.ehr.client import FakeEHRClient
from mcp_fhir.policy.engine import Decision, FakePolicyEngine, Obligations

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
class RecordingSink:
    """An audit sink in memory. `fail` makes writes fail; `gate` (when set) holds each write until it opens."""

    records: list[AuditRecord] = field(default_factory=list)
    fail: bool = False
    gate: asyncio.Event | None = None
    waiting: int = 0
    stored: list[dict[str, Any]] = field(default_factory=list)  # what `query` answers
    queries: list[dict[str, Any]] = field(default_factory=list)

    async def record(self, rec: AuditRecord) -> str:
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
        if self.fail:
            raise OSError("disk full")
        self.records.append(rec)
        return str(len(self.records))

    async def check(self) -> bool:
        return not self.fail

    async def query(
        self, f: Any, *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.queries.append({"filter": f, "limit": limit, "cursor": cursor})
        return [dict(r) for r in self.stored[:limit]], None

    async def close(self) -> None:
        return None


@dataclass
class Harness:
    engine: FakePolicyEngine
    ehr: FakeEHRClient
    sink: RecordingSink
    app: AppContext

    @property
    def ctx(self) -> Any:
        return SimpleNamespace(request_context=SimpleNamespace(lifespan_context=self.app))

    def set_decision(self, decide: Callable[[Mapping[str, Any]], Decision]) -> None:
        self.engine._decide = decide


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
    sink = RecordingSink()
    options: dict[str, Any] = {
        "idmap": IdentityIds(),
        "local_subject": SUBJECT,
        "continuation_key": KEY,
        "enabled_tools": frozenset(CATALOGUE),
        **app_overrides,
    }
    app = AppContext(
        engine=engine or fake, backends={"fake": ehr}, default_backend="fake", audit=sink, **options
    )
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


class _Capture:
    """Collects the tool functions a module registers, so tests can call them directly."""

    def __init__(self) -> None:
        self.tools: dict[str, Any] = {}

    def tool(self, name: str | None = None, **_kw: Any) -> Any:
        def deco(fn: Any) -> Any:
            self.tools[name or fn.__name__] = fn
            return fn

        return deco


def registered_tools(register: Any) -> dict[str, Any]:
    """The tool functions `register(server)` would add, by name."""
    capture = _Capture()
    register(capture)
    return capture.tools
