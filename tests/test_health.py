"""`readiness()`: OPA healthy with the expected bundle revision, audit writable, no open breaker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from mcp_fhir import health


@dataclass
class FakeEngine:
    ok: bool = True
    revision: str | None = "2026.11.1"
    hang: asyncio.Event | None = None

    async def healthy(self) -> bool:
        if self.hang is not None:
            await self.hang.wait()
        return self.ok

    async def active_revision(self) -> str | None:
        return self.revision


@dataclass
class FakeAudit:
    ok: bool = True

    async def check(self) -> bool:
        return self.ok


@dataclass
class FakeApp:
    engine: Any = field(default_factory=FakeEngine)
    audit: Any = field(default_factory=FakeAudit)
    backends: dict[str, Any] = field(default_factory=dict)


async def test_not_started_is_not_ready():
    report = await health.readiness(None)
    assert report == {"ready": False, "checks": {"started": False}}


async def test_healthy_opa_and_writable_audit_is_ready():
    report = await health.readiness(FakeApp())  # type: ignore[arg-type]
    assert report["ready"] is True
    assert report["checks"]["opa"] is True and report["checks"]["audit"] is True


async def test_an_unhealthy_opa_is_not_ready():
    report = await health.readiness(FakeApp(engine=FakeEngine(ok=False)))  # type: ignore[arg-type]
    assert report["ready"] is False and report["checks"]["opa"] is False


async def test_an_unwritable_audit_sink_is_not_ready():
    report = await health.readiness(FakeApp(audit=FakeAudit(ok=False)))  # type: ignore[arg-type]
    assert report["ready"] is False and report["checks"]["audit"] is False


async def test_the_wrong_policy_revision_is_not_ready_and_is_reported():
    app = FakeApp(engine=FakeEngine(revision="2026.10.9"))
    report = await health.readiness(app, expected_revision="2026.11.1")  # type: ignore[arg-type]
    assert report["ready"] is False
    assert report["checks"]["policy_revision"] == {"expected": "2026.11.1", "active": "2026.10.9"}


async def test_the_expected_policy_revision_is_ready():
    report = await health.readiness(FakeApp(), expected_revision="2026.11.1")  # type: ignore[arg-type]
    assert report["ready"] is True


async def test_a_hanging_opa_health_check_is_bounded_and_not_ready(monkeypatch):
    monkeypatch.setattr(health, "READINESS_TIMEOUT", 0.05)
    app = FakeApp(engine=FakeEngine(hang=asyncio.Event()))
    report = await health.readiness(app)  # type: ignore[arg-type]
    assert report["ready"] is False and report["checks"]["opa"] is False


@dataclass
class FakeBackend:
    ok: bool = True
    probes: int = 0
    hang: asyncio.Event | None = None

    async def healthy(self) -> bool:
        self.probes += 1
        if self.hang is not None:
            await self.hang.wait()
        return self.ok


async def test_each_backend_is_reported_and_one_that_does_not_answer_metadata_is_not_ready():
    app = FakeApp(backends={"good": FakeBackend(), "wrong_url": FakeBackend(ok=False)})
    report = await health.readiness(app)  # type: ignore[arg-type]
    assert report["ready"] is False
    assert report["checks"]["backends"] == {
        "good": {"ready": True, "metadata": True, "breaker": "closed"},
        "wrong_url": {"ready": False, "metadata": False, "breaker": "closed"},
    }


async def test_every_backend_answering_metadata_is_ready():
    app = FakeApp(backends={"a": FakeBackend(), "b": FakeBackend()})
    report = await health.readiness(app)  # type: ignore[arg-type]
    assert report["ready"] is True


async def test_a_backend_answer_is_reused_for_the_ttl_then_probed_again():
    now = [100.0]
    probes = health.BackendProbes(ttl=10.0, clock=lambda: now[0])
    backend = FakeBackend()
    app = FakeApp(backends={"ehr": backend})
    for _ in range(3):
        await health.readiness(app, probes=probes)  # type: ignore[arg-type]
    assert backend.probes == 1
    now[0] += 10.0
    await health.readiness(app, probes=probes)  # type: ignore[arg-type]
    assert backend.probes == 2


async def test_a_recovered_backend_is_ready_again_after_the_ttl():
    now = [0.0]
    probes = health.BackendProbes(ttl=5.0, clock=lambda: now[0])
    backend = FakeBackend(ok=False)
    app = FakeApp(backends={"ehr": backend})
    assert (await health.readiness(app, probes=probes))["ready"] is False  # type: ignore[arg-type]
    backend.ok = True
    now[0] = 5.0
    assert (await health.readiness(app, probes=probes))["ready"] is True  # type: ignore[arg-type]


async def test_a_hanging_backend_probe_is_bounded_and_not_ready(monkeypatch):
    monkeypatch.setattr(health, "READINESS_TIMEOUT", 0.05)
    app = FakeApp(backends={"ehr": FakeBackend(hang=asyncio.Event())})
    report = await health.readiness(app)  # type: ignore[arg-type]
    assert report["ready"] is False and report["checks"]["backends"]["ehr"]["metadata"] is False
