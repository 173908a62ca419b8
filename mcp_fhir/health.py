"""Liveness and readiness, computed from the live components. Health observes; it decides nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from mcp_fhir.context import AppContext

READINESS_TIMEOUT = 3.0


async def readiness(app: AppContext | None, *, expected_revision: str | None = None) -> dict[str, Any]:
    """Ready when OPA is healthy (with the expected bundle revision), audit is writable, and backends are known."""
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
    from mcp_fhir.backends import breaker_snapshot

    checks["backends"] = breaker_snapshot(app.backends)  # type: ignore[arg-type]
    backends_ok = all(state != "open" for state in checks["backends"].values())
    return {"ready": opa_ok and audit_ok and backends_ok, "checks": checks}


async def _revision(engine: Any) -> str | None:
    active = getattr(engine, "active_revision", None)
    return await active() if active is not None else None
