"""The stdio drain (`mcp_fhir/cli/stdio.py`), on a real pipe: after a stop, no new call is read, the one in
flight keeps the session open until its response is written, and the wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mcp_fhir.cli.stdio import _CountingWriter, _InFlight, _StdinLines

LONG_DRAIN_S = 30.0  # never reached when the call is answered
SHORT_DRAIN_S = 0.05  # the bound under test
STEP_TIMEOUT_S = 10.0


@dataclass
class Response:
    id: Any


@dataclass
class Envelope:
    message: Any


class Sink:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, item: Any) -> None:
        self.sent.append(item)


def _line(**message: Any) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


async def _next(lines: _StdinLines) -> str:
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await lines.__anext__()


async def test_after_a_stop_the_call_in_flight_is_answered_before_the_session_ends_and_no_new_call_is_read(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    inflight, stop = _InFlight(), asyncio.Event()
    lines = _StdinLines(read_fd, inflight, stop, LONG_DRAIN_S)
    writer = _CountingWriter(Sink(), inflight)
    os.write(write_fd, _line(id=7, method="tools/call", params={}))
    assert json.loads(await _next(lines))["id"] == 7
    assert len(inflight) == 1

    stop.set()
    os.write(write_fd, _line(id=8, method="tools/call", params={}))  # arrives after the stop
    ending = asyncio.ensure_future(lines.__anext__())
    for _ in range(10):  # yields, not a timed wait: it has every chance to end early, and must not
        await asyncio.sleep(0)
    assert not ending.done()  # the session stays open while call 7 runs
    await writer.send(Envelope(Response(id=7)))
    async with asyncio.timeout(STEP_TIMEOUT_S):
        with pytest.raises(StopAsyncIteration):
            await ending
    assert len(inflight) == 0


async def test_a_call_that_outlives_the_bound_does_not_hold_the_session_open(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    inflight, stop = _InFlight(), asyncio.Event()
    lines = _StdinLines(read_fd, inflight, stop, SHORT_DRAIN_S)
    os.write(write_fd, _line(id="slow", method="tools/call", params={}))
    await _next(lines)
    stop.set()
    async with asyncio.timeout(STEP_TIMEOUT_S):
        with pytest.raises(StopAsyncIteration):
            await lines.__anext__()
    assert len(inflight) == 1


async def test_notifications_and_client_responses_are_not_calls_in_flight(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    inflight = _InFlight()
    lines = _StdinLines(read_fd, inflight, asyncio.Event(), LONG_DRAIN_S)
    os.write(write_fd, _line(method="notifications/initialized") + _line(id=3, result={}) + b"not json\n")
    for _ in range(3):
        await _next(lines)
    assert len(inflight) == 0


async def test_end_of_input_ends_the_session(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    lines = _StdinLines(read_fd, _InFlight(), asyncio.Event(), LONG_DRAIN_S)
    os.write(write_fd, _line(id=1, method="ping"))
    os.close(write_fd)
    assert json.loads(await _next(lines))["method"] == "ping"
    async with asyncio.timeout(STEP_TIMEOUT_S):
        with pytest.raises(StopAsyncIteration):
            await lines.__anext__()
