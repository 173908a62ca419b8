"""Ten agents share one backend's rate limit; the upstream enforces the same limit itself.

The upstream is a tiny aiohttp server on loopback with its own token bucket (100 requests per
minute, burst 16, the Oracle Health figures) that answers 429 when it runs dry. Through our
limiter, no 429 is ever produced, and every call either succeeds or fails fast with
``upstream_rate_limited``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest
from aiohttp import web

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.testbed` is not importable under --import-mode=importlib otherwise
    sys.path.insert(0, _ROOT)

from mcp_fhir._exceptions import UpstreamRateLimited  # noqa: E402
from mcp_fhir.resilience.ratelimit import RateLimit, RateLimiter, parse_retry_after  # noqa: E402
from tests.testbed.fault_proxy import Fault, FaultProxy, _LoopThread  # noqa: E402

pytestmark = pytest.mark.integration

LIMIT_PER_MINUTE = 100
BURST = 16
AGENTS = 10
PERIOD_S = 8.0
MAX_CALLS_PER_AGENT = 12


class LimitedUpstream:
    """A loopback FHIR-ish server that enforces its own token bucket and answers 429 beyond it."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.ok = 0
        self.too_many = 0
        self._lock = threading.Lock()
        self._thread: _LoopThread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                self.ok += 1
                return True
            self.too_many += 1
            return False

    async def _handle(self, request: web.Request) -> web.Response:
        if not self._take():
            return web.json_response(
                {"resourceType": "OperationOutcome"}, status=429, headers={"Retry-After": "1"}
            )
        return web.json_response({"resourceType": "Patient", "id": request.match_info["id"]})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/Patient/{id}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def __enter__(self) -> LimitedUpstream:
        self._thread = _LoopThread("limited-upstream")
        self._thread.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._runner is not None:
            self._thread.run(self._runner.cleanup())
            self._thread.stop()


async def test_ten_concurrent_agents_never_trigger_a_429_from_an_upstream_with_the_same_limit():
    limiter = RateLimiter({"oracle": RateLimit(LIMIT_PER_MINUTE, burst=BURST)})
    outcomes: list[str] = []
    deadline = time.monotonic() + PERIOD_S

    async def agent(n: int, client: httpx2.AsyncClient) -> None:
        for i in range(MAX_CALLS_PER_AGENT):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await limiter.acquire("oracle", max_wait=min(5.0, remaining))
            except UpstreamRateLimited as exc:
                outcomes.append(exc.code)
                continue
            response = await client.get(f"/Patient/a{n}-{i}")
            outcomes.append("ok" if response.status_code == 200 else f"http_{response.status_code}")

    with LimitedUpstream(LIMIT_PER_MINUTE, BURST) as upstream:
        async with httpx2.AsyncClient(base_url=upstream.url, timeout=5.0) as client:
            await asyncio.gather(*(agent(n, client) for n in range(AGENTS)))

    assert upstream.too_many == 0
    assert set(outcomes) <= {"ok", "upstream_rate_limited"}
    successes = outcomes.count("ok")
    # the burst (16 less one token of headroom) plus about 8 s / 0.6 s of refill
    assert 15 + 10 <= successes <= 15 + int(PERIOD_S / 0.6) + 1
    assert upstream.ok == successes
    assert "upstream_rate_limited" in outcomes


async def test_without_the_limiter_the_same_agents_do_get_429s():
    """The control: the upstream really enforces its limit, so the test above can fail."""
    with LimitedUpstream(LIMIT_PER_MINUTE, BURST) as upstream:
        async with httpx2.AsyncClient(base_url=upstream.url, timeout=5.0) as client:
            responses = await asyncio.gather(*(client.get(f"/Patient/c{n}") for n in range(AGENTS * 3)))
    assert sum(r.status_code == 429 for r in responses) >= AGENTS * 3 - BURST - 2
    assert upstream.too_many > 0


async def test_a_429_with_retry_after_holds_back_the_next_request_and_the_limit_still_holds():
    limiter = RateLimiter({"oracle": RateLimit(LIMIT_PER_MINUTE, burst=BURST)})
    with LimitedUpstream(LIMIT_PER_MINUTE, BURST) as upstream, FaultProxy(upstream=upstream.url) as proxy:
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=5.0) as client:
            await limiter.acquire("oracle")
            assert (await client.get("/Patient/1")).status_code == 200

            proxy.set_fault(Fault.status(429, headers={"Retry-After": "1"}), times=1)
            await limiter.acquire("oracle")
            throttled = await client.get("/Patient/2")
            assert throttled.status_code == 429
            await limiter.penalise(
                "oracle", parse_retry_after(throttled.headers.get("retry-after"), time.time())
            )

            waited = await limiter.acquire("oracle")
            assert waited >= 1.0
            assert (await client.get("/Patient/3")).status_code == 200
            # after the penalty the bucket restarts empty: the next slot is a full interval away
            with pytest.raises(UpstreamRateLimited):
                await limiter.acquire("oracle", max_wait=0.3)
    assert upstream.too_many == 0
    assert proxy.requests_forwarded == 2
