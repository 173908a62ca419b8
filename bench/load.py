"""Closed-loop cells (N streams, sequential calls each) and an open-loop paced load.

Every loop is bounded twice: by wall-clock time and by a call count. Streams are opened before
the clock starts (session set-up is not measured), each makes one unmeasured warm-up call, and
all start together on an `asyncio.Event`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any

from bench.stats import BenchError, CellResult, summarise

DEFAULT_CELL_SECONDS = 5.0
MAX_CALLS_PER_CELL = 200_000  # a hard cap whatever the speed
DEFAULT_SETUP_TIMEOUT = 60.0  # seconds to open every stream of a cell
MAX_ERRORS_PER_CELL = 1_000  # a cell that fails this often stops early: the figure would be meaningless

Op = Callable[[], Awaitable[object]]
# A stream factory: an async context manager that yields one stream's `op` (one call per await).
StreamFactory = Callable[[], AbstractAsyncContextManager[Op]]


@dataclass
class _Tally:
    latencies: list[float]
    errors: int = 0
    calls: int = 0


@dataclass
class CellSamples:
    """The raw outcome of one closed-loop cell: every latency (s), the errors and the elapsed time."""

    latencies: list[float]
    errors: int
    seconds: float

    def summary(self) -> CellResult:
        return summarise(self.latencies, errors=self.errors, seconds=self.seconds)


async def run_cell(stream: StreamFactory, concurrency: int, **limits: Any) -> CellResult:
    """`run_cell_samples` (same limits: seconds, max_calls, setup_timeout), summarised."""
    return (await run_cell_samples(stream, concurrency, **limits)).summary()


async def run_cell_samples(
    stream: StreamFactory,
    concurrency: int,
    *,
    seconds: float = DEFAULT_CELL_SECONDS,
    max_calls: int = MAX_CALLS_PER_CELL,
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT,
) -> CellSamples:
    """`concurrency` streams, each calling its op in turn until `seconds` pass or `max_calls` are made.

    Keeps the raw latencies, so that several rounds of one cell can be merged.
    """
    if concurrency < 1 or seconds <= 0 or max_calls < 1:
        raise BenchError("concurrency, seconds and max_calls must be positive")
    tally = _Tally([])
    start = asyncio.Event()
    stop_at = [0.0]

    async def one(op: Op) -> None:
        await start.wait()
        while (
            time.perf_counter() < stop_at[0]
            and tally.calls < max_calls
            and tally.errors < MAX_ERRORS_PER_CELL
        ):
            tally.calls += 1
            began = time.perf_counter()
            try:
                await op()
            except Exception:
                tally.errors += 1
                continue
            tally.latencies.append(time.perf_counter() - began)

    async with AsyncExitStack() as stack:
        async with asyncio.timeout(setup_timeout):
            ops = [await stack.enter_async_context(stream()) for _ in range(concurrency)]
            # Warm-up, unmeasured; a failure here shows up again (and is counted) in the cell itself.
            await asyncio.gather(*(op() for op in ops), return_exceptions=True)
        tasks = [asyncio.create_task(one(op)) for op in ops]
        began = time.perf_counter()
        stop_at[0] = began + seconds
        start.set()
        async with asyncio.timeout(seconds + setup_timeout):
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    return CellSamples(tally.latencies, tally.errors, elapsed)


async def run_paced(op: Op, *, rate: float, seconds: float, max_in_flight: int = 256) -> CellResult:
    """Open loop: start one call every 1/`rate` s for `seconds`, whatever the previous ones are doing.

    Latency is measured from each call's scheduled start, so queueing behind a slow call counts
    (no coordinated omission). At most `max_in_flight` calls run at once; beyond that a call is
    counted as an error rather than queued without bound.
    """
    if rate <= 0 or seconds <= 0:
        raise BenchError("rate and seconds must be positive")
    total = int(rate * seconds)
    tally = _Tally([])
    in_flight: set[asyncio.Task[None]] = set()
    began = time.perf_counter()

    async def one(scheduled: float) -> None:
        try:
            await op()
        except Exception:
            tally.errors += 1
            return
        tally.latencies.append(time.perf_counter() - scheduled)

    for i in range(total):
        scheduled = began + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load, not synchronising with it
        if len(in_flight) >= max_in_flight:
            tally.errors += 1
            continue
        task = asyncio.create_task(one(scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    async with asyncio.timeout(30.0):
        await asyncio.gather(*in_flight)
    return summarise(tally.latencies, errors=tally.errors, seconds=time.perf_counter() - began)


async def no_context(op: Op) -> AsyncIterator[Op]:
    """For streams that share one client: yield the op unchanged."""
    yield op
