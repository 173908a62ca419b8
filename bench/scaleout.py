"""Scale-out: two sidecar replicas sharing Redis (cache) and PostgreSQL (audit, ID map) on loopback.

1. Throughput at c=32 against one replica, then the same streams split across two, cache warm.
2. The global rate limit: two replicas with the cache off, every call reaching the FHIR server
   through a counting proxy; the count is compared with what one shared limit would allow.

Needs `eval "$(scripts/services.sh start)"` (MCP_FHIR_TEST_POSTGRES_DSN, MCP_FHIR_TEST_REDIS_URL).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from pathlib import Path
from typing import Any

from bench.load import run_cell
from bench.procs import Child, start_sidecar

POSTGRES_ENV = "MCP_FHIR_TEST_POSTGRES_DSN"
REDIS_ENV = "MCP_FHIR_TEST_REDIS_URL"
SCALE_CONCURRENCY = 32
RATE_LIMIT_PER_MINUTE = 120  # low enough that the burst and the rate are both visible in a few seconds
RATE_LIMIT_CONCURRENCY = 8
RATE_LIMIT_SECONDS = 6.0
AUDIT_SCHEMA = "bench_audit"
BURST_FRACTION = 1 / 6  # mcp_fhir.resilience.ratelimit.DEFAULT_BURST_FRACTION


def allowed_by_one_limit(per_minute: int, seconds: float) -> int:
    """Requests one shared limit lets through in `seconds`, burst included."""
    return int(per_minute * BURST_FRACTION) + int(per_minute * seconds / 60.0) + 1


def _replica_cfg(
    workdir: Path, fhir_url: str, opa_url: str, digest: str, port: int, prefix: str, cache: bool
) -> dict[str, Any]:
    from bench.sidecar import sidecar_cfg

    cfg = sidecar_cfg(workdir, fhir_url, opa_url, digest, port)
    cfg["backends"] = {"testbed": {"base_url": fhir_url, "rate_limit_per_minute": RATE_LIMIT_PER_MINUTE}}
    # One limit for every replica: the token bucket lives in Redis (rate_limit.store: redis).
    cfg["rate_limit"] = {"store": "redis", "redis_url_env": REDIS_ENV, "redis_key_prefix": f"{prefix}rl:"}
    cfg["cache"] = (
        {"enabled": True, "backend": "redis", "redis_url_env": REDIS_ENV, "redis_key_prefix": prefix}
        if cache
        else {"enabled": False}
    )
    cfg["audit"] = {"sink": "postgres", "dsn_env": POSTGRES_ENV, "pg_schema": AUDIT_SCHEMA}
    cfg["idmap"] = {"kind": "postgres", "dsn_env": POSTGRES_ENV, "seed_file": cfg["idmap"]["seed_file"]}
    return cfg


async def scale_out(bench: Any, fhir_url: str) -> dict[str, Any]:
    missing = [name for name in (POSTGRES_ENV, REDIS_ENV) if not os.environ.get(name)]
    if missing:
        return {"skipped": f'{", ".join(missing)} not set: run eval "$(scripts/services.sh start)"'}
    from bench.sidecar import PATIENT, PURPOSE, mcp_stream
    from mcp_fhir.agent_auth.api_keys import generate_api_key
    from mcp_fhir.audit.sinks.postgres import setup_postgres_schema
    from mcp_fhir.policy.managed_opa import ManagedOpa, free_port
    from tests.testbed.fault_proxy import FaultProxy
    from tests.testbed.sidecar import POLICIES

    await asyncio.to_thread(setup_postgres_schema, os.environ[POSTGRES_ENV], schema=AUDIT_SCHEMA)
    origin, _, base_path = fhir_url.partition("/fhir")
    key, digest = generate_api_key()
    arguments = {"patient_id": PATIENT, "purpose": PURPOSE}
    out: dict[str, Any] = {
        "note": "the replicas share one rate limit through Redis (rate_limit.store: redis)"
    }
    children: list[Child] = []

    async def replica(name: str, upstream: str, prefix: str, cache: bool) -> Child:
        cfg = _replica_cfg(bench.workdir / name, upstream, opa.url, digest, free_port(), prefix, cache)
        child = await start_sidecar(name, cfg, bench.workdir)
        children.append(child)
        return child

    def streams(*urls: str):
        cycle = itertools.cycle(urls)
        return lambda: mcp_stream(next(cycle), key, "read_patient", arguments)

    async with ManagedOpa([POLICIES], decision_log=bench.workdir / "opa-scaleout.log") as opa:
        proxy = FaultProxy(upstream=origin)
        async with proxy:
            upstream = proxy.url + "/fhir" + base_path
            try:
                prefix = f"bench-{uuid.uuid4().hex[:8]}:"
                one = await replica("replica-1", upstream, prefix, True)
                two = await replica("replica-2", upstream, prefix, True)
                single = await run_cell(streams(one.url), SCALE_CONCURRENCY, seconds=bench.seconds)
                both = await run_cell(streams(one.url, two.url), SCALE_CONCURRENCY, seconds=bench.seconds)
                out["throughput_c32"] = {"one_replica": single.to_dict(), "two_replicas": both.to_dict()}
                bench.log(f"scale-out c=32: one {single.throughput:.1f}/s, two {both.throughput:.1f}/s")

                limited = [await replica(f"limited-{i}", upstream, prefix, False) for i in (1, 2)]
                before = proxy.requests_forwarded
                cell = await run_cell(
                    streams(*(c.url for c in limited)), RATE_LIMIT_CONCURRENCY, seconds=RATE_LIMIT_SECONDS
                )
                forwarded = proxy.requests_forwarded - before
                # The warm-up call of every stream is inside the window as well; bound it the same way.
                allowed = allowed_by_one_limit(RATE_LIMIT_PER_MINUTE, cell.seconds + 1.0)
                out["rate_limit"] = {
                    "per_minute": RATE_LIMIT_PER_MINUTE,
                    "seconds": round(cell.seconds, 2),
                    "fhir_requests_seen": forwarded,
                    "allowed_by_one_shared_limit": allowed,
                    "held": forwarded <= allowed,
                    "calls_ok": cell.calls,
                    "calls_rejected": cell.errors,
                }
                bench.log(f"rate limit: {forwarded} FHIR requests vs {allowed} allowed by one shared limit")
            finally:
                for child in children:
                    await child.stop()
    return out
