"""`python -m bench.http_clients`: what one FHIR read costs in each HTTP client the sidecar carries.

The rest of the stack speaks httpx2 (the MCP SDK, SMART token requests); OPA's client and, since this
measurement, the EHR transport (`mcp_fhir/ehr/transport.py`) use aiohttp. This measures both clients
doing the same keep-alive GET of `Patient/<id>` on the FHIR test bed, in turns (rounds), and prints
the CPU time and the wall time per request of this process, and the ratios httpx2/aiohttp, all
measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx2

from bench.stats import BenchError

DEFAULT_REQUESTS = 500  # per client and round
DEFAULT_ROUNDS = 3
MAX_REQUESTS = 20_000
WARM_UP = 50
REQUEST_TIMEOUT = 10.0
PATIENT = "pat-au-001"
ACCEPT = {"Accept": "application/fhir+json"}

Get = Callable[[], Awaitable[object]]


async def _measure(get: Get, requests: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per request over `requests` sequential calls, after a warm-up."""
    for _ in range(WARM_UP):
        await get()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        await get()
    return (time.process_time() - cpu) / requests * 1e3, (time.perf_counter() - wall) / requests * 1e3


async def compare(url: str, *, requests: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median CPU and wall ms per request for each client, and the httpx2/aiohttp ratios."""
    results: dict[str, list[tuple[float, float]]] = {"httpx2": [], "aiohttp": []}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with (
        httpx2.AsyncClient(timeout=REQUEST_TIMEOUT) as hx,
        aiohttp.ClientSession(timeout=timeout) as ai,
    ):

        async def httpx2_get() -> object:
            response = await hx.get(url, headers=ACCEPT)
            if response.status_code != 200:
                raise BenchError("the FHIR read failed")
            return response.json()

        async def aiohttp_get() -> object:
            async with ai.get(url, headers=ACCEPT) as response:
                if response.status != 200:
                    raise BenchError("the FHIR read failed")
                return await response.json(content_type=None)

        for _ in range(rounds):
            results["httpx2"].append(await _measure(httpx2_get, requests))
            results["aiohttp"].append(await _measure(aiohttp_get, requests))
    out = {
        name: {
            "cpu_ms": statistics.median(c for c, _ in runs),
            "wall_ms": statistics.median(w for _, w in runs),
        }
        for name, runs in results.items()
    }
    out["httpx2/aiohttp"] = {key: out["httpx2"][key] / out["aiohttp"][key] for key in ("cpu_ms", "wall_ms")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.rounds <= 20:
        p.error(f"--requests must be 1..{MAX_REQUESTS} and --rounds 1..20")
    from tests.testbed.fhir import start_fhir_server

    with start_fhir_server() as fhir:
        out = asyncio.run(
            compare(f"{fhir.base_url}/Patient/{PATIENT}", requests=args.requests, rounds=args.rounds)
        )
    print(f"{'client':16} {'CPU ms/request':>15} {'wall ms/request':>16}")
    for name, row in out.items():
        print(f"{name:16} {row['cpu_ms']:>15.3f} {row['wall_ms']:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
