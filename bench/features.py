"""`python -m bench.features`: what issue #21's per-call features cost the sidecar's own Python, alone.

The same `search_observations` call runs through the whole `CallPath.run` over the in-package fakes (so
the policy engine, the EHR and the audit trail cost nothing and only the call path is measured), in
interleaved rounds, with each feature off and on:

    base        activity off, tracing off (the defaults)
    activity    per-subject activity counters in memory (`activity.store: memory`)
    consent     consent directives read through a warm TTL cache (one provision)
    tracing     OpenTelemetry on: the SDK's provider with a batching processor to an in-memory exporter

It prints CPU µs per call (the median over rounds) and each feature's cost beside `base`. The cost of the
Redis store is one pipelined round trip per call on top of `activity` (see docs/performance.md). This is
a benchmark, not a test: `tests/bench/test_bench_smoke.py` only checks it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from mcp_fhir import tracing
from mcp_fhir.activity import MemoryActivity
from mcp_fhir.consent import ConsentReader, MemoryConsentStore
from tests.tools.conftest import PATIENT, make_harness, observation

ARGS = {"patient_id": PATIENT, "purpose": "treatment"}
CONSENT = {
    "resourceType": "Consent",
    "id": "bench-consent",
    "status": "active",
    "patient": {"reference": f"Patient/{PATIENT}"},
    "provision": {"type": "permit", "provision": [{"type": "deny", "securityLabel": [{"code": "PSY"}]}]},
}


def _sdk_tracer() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    return tracing.CallTracer(provider.get_tracer("bench"))


async def _variant(name: str) -> Callable[[], Any]:
    resources = [observation(f"o{i}") for i in range(5)]
    overrides: dict[str, Any] = {}
    if name == "activity":
        overrides["activity"] = MemoryActivity()
    if name == "consent":
        store = MemoryConsentStore()
        await store.put(CONSENT)
        overrides["consent"] = ConsentReader(store, ttl_seconds=3600)
    harness = make_harness(resources=resources, **overrides)
    return lambda: harness.run("search_observations", **ARGS)


async def measure(calls: int, rounds: int) -> dict[str, float]:
    """CPU µs per call for each variant: the median over interleaved rounds."""
    variants = ("base", "activity", "consent", "tracing")
    runs = {name: await _variant(name) for name in variants}
    no_op, sdk = tracing.TRACER, _sdk_tracer()
    per_call: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            tracing.TRACER = sdk if name == "tracing" else no_op
            call = runs[name]
            await call()  # warm
            start = time.process_time()
            for _ in range(calls):
                await call()
            per_call[name].append((time.process_time() - start) / calls * 1e6)
    tracing.TRACER = no_op
    return {name: statistics.median(values) for name, values in per_call.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per variant per round (default 500)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.calls, args.rounds))
    base = result["base"]
    print(f"{'variant':10} {'CPU µs/call':>12} {'vs base':>9}")
    for name, value in result.items():
        print(f"{name:10} {value:12.0f} {value - base:+8.0f}")


if __name__ == "__main__":
    main()
