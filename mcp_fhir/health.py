"""Liveness and readiness, computed from the live components. Health observes; it decides nothing.

Ready means: OPA answers `/health` (with the expected bundle revision when one is configured), the audit
sink is writable, and every backend answers `GET /metadata` with a CapabilityStatement and its circuit
breaker is not open. Each backend is reported on its own. A backend's answer is cached for
`BACKEND_CHECK_TTL` seconds, so a readiness probe every few seconds costs the EHR one request per
backend per interval, not one per probe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from mcp_fhir.context import AppContext

READINESS_TIMEOUT = 3.0
BACKEND_CHECK_TTL = 10.0  # seconds a backend's /metadata answer is reused by readiness


class BackendProbes:
    """Each backend's last `/metadata` answer, reused for `ttl` seconds."""

    def __init__(
        self, *, ttl: float = BACKEND_CHECK_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, bool]] = {}

    async def reachable(self, name: str, client: Any) -> bool:
        now = self._clock()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        healthy = getattr(client, "healthy", None)
        ok = True
        if healthy is not None:
            try:
                async with asyncio.timeout(READINESS_TIMEOUT):
                    ok = bool(await healthy())
            except TimeoutError:
                ok = False
        self._cache[name] = (now, ok)
        return ok


async def readiness(
    app: AppContext | None, *, expected_revision: str | None = None, probes: BackendProbes | None = None
) -> dict[str, Any]:
    """Ready when OPA is healthy (with the expected bundle revision), audit is writable, and every backend answers."""
    if app is None:
        return {"ready": False, "checks": {"started": False}}
    checks: dict[str, Any] = {}
    engine = app.engine
    opa_ok = False
    healthy = getattr(engine, "healthy", None)
    if healthy is not None:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT):
                opa_ok = bool(await healthy())
        except TimeoutError:
            opa_ok = False
    checks["opa"] = opa_ok
    if expected_revision is not None:
        revision = await _revision(engine)
        checks["policy_revision"] = {"expected": expected_revision, "active": revision}
        opa_ok = opa_ok and revision == expected_revision
    try:
        async with asyncio.timeout(READINESS_TIMEOUT):
            audit_ok = bool(await app.audit.check())
    except TimeoutError:
        audit_ok = False
    checks["audit"] = audit_ok
    checks["backends"] = await _backends(app.backends, probes or BackendProbes(ttl=0.0))
    backends_ok = all(b["ready"] for b in checks["backends"].values())
    return {"ready": opa_ok and audit_ok and backends_ok, "checks": checks}


async def _backends(clients: Mapping[str, Any], probes: BackendProbes) -> dict[str, dict[str, Any]]:
    """Per backend: does `/metadata` answer, and the breaker's state. Probed concurrently."""
    from mcp_fhir.backends import breaker_snapshot

    names = list(clients)
    reachable = await asyncio.gather(*(probes.reachable(n, clients[n]) for n in names))
    breakers = breaker_snapshot(clients)  # type: ignore[arg-type]
    out: dict[str, dict[str, Any]] = {}
    for name, ok in zip(names, reachable, strict=True):
        breaker = breakers.get(name, "closed")
        out[name] = {"ready": ok and breaker != "open", "metadata": ok, "breaker": breaker}
    return out


async def _revision(engine: Any) -> str | None:
    active = getattr(engine, "active_revision", None)
    return await active() if active is not None else None
