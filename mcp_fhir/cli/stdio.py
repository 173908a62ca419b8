"""`mcp-fhir serve` over stdio, with our signals: SIGTERM or SIGINT is a drained, sealed, clean exit,
and SIGHUP reloads the config file's policy data as it does over HTTP (``on_hup``).

On SIGTERM or SIGINT the server stops reading calls from stdin, lets the calls in flight finish (bounded
by ``drain_timeout``), then ends the session as if the client had closed stdin: the SDK's session
returns and the server's lifespan closes the audit trail (``AuditTrail.close`` seals it with a signed
checkpoint) and stops the managed OPA child. ``serve`` then exits 0. Calls that arrive after the signal
are not read; a call still running when the bound passes is cancelled by the SDK, and no result of
it leaves.

Why hand-written around the SDK's ``stdio_server``: ``MCPServer.run("stdio")`` installs no signal
handler (SIGTERM kills the process, status -15, with the trail unsealed), the SDK's dispatcher cancels
the handlers still running as soon as its read side ends, and its stdin reader blocks in a worker
thread that cannot be cancelled until the client closes stdin. So this module gives ``stdio_server``
its own stdin: lines read by a daemon thread from a private duplicate of fd 0 (``os.read`` on a raw
descriptor holds no interpreter lock at exit), which it can end on a signal, once the requests it
forwarded have all been answered (it counts the responses the server writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

__all__ = ["serve_stdio"]

log = logging.getLogger("mcp_fhir.cli")

READ_CHUNK = 65536
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _request_key(request_id: Any) -> str:
    return json.dumps(request_id, sort_keys=True)


class _InFlight:
    """Requests forwarded to the server whose response it has not written yet."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def started(self, request_id: Any) -> None:
        self._ids.add(_request_key(request_id))
        self._idle.clear()

    def answered(self, request_id: Any) -> None:
        self._ids.discard(_request_key(request_id))
        if not self._ids:
            self._idle.set()

    def __len__(self) -> int:
        return len(self._ids)

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _StdinLines:
    """stdin as the async line iterator ``stdio_server`` reads; it ends at EOF or, drained, after ``stop``."""

    def __init__(self, fd: int, inflight: _InFlight, stop: asyncio.Event, drain_timeout: float) -> None:
        self._inflight = inflight
        self._stop = stop
        self._drain_timeout = drain_timeout
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._read, args=(fd, loop), name="stdin-reader", daemon=True)
        self._thread.start()

    def _read(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(fd, READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    loop.call_soon_threadsafe(self._lines.put_nowait, raw.decode("utf-8", "replace") + "\n")
            if pending:
                loop.call_soon_threadsafe(self._lines.put_nowait, pending.decode("utf-8", "replace"))
        except (OSError, RuntimeError):  # fd closed, or the loop already gone at exit
            pass
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._lines.put_nowait, None)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if not self._stop.is_set():
            line_task = asyncio.ensure_future(self._lines.get())
            stop_task = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_task.cancel()
            if line_task.done() and not self._stop.is_set():
                line = line_task.result()
                if line is None:
                    raise StopAsyncIteration
                self._note_request(line)
                return line
            line_task.cancel()
        await self._drain()
        raise StopAsyncIteration

    def _note_request(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if isinstance(message, dict) and "method" in message and message.get("id") is not None:
            self._inflight.started(message["id"])

    async def _drain(self) -> None:
        waiting = len(self._inflight)
        if waiting:
            log.info("stopping: waiting up to %.0fs for %d call(s) in flight", self._drain_timeout, waiting)
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self._inflight.wait_idle()
        except TimeoutError:
            log.warning("stopping: %d call(s) still in flight after %.0fs are cut", len(self._inflight),
                        self._drain_timeout)  # fmt: skip


class _CountingWriter:
    """The server's write stream, noting each response it carries (a message with an id and no method)."""

    def __init__(self, inner: Any, inflight: _InFlight) -> None:
        self._inner = inner
        self._inflight = inflight

    async def send(self, item: Any) -> None:
        await self._inner.send(item)
        message = getattr(item, "message", None)
        if (
            message is not None
            and not hasattr(message, "method")
            and getattr(message, "id", None) is not None
        ):
            self._inflight.answered(message.id)

    async def __aenter__(self) -> _CountingWriter:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        return cast("bool | None", await self._inner.__aexit__(*exc))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def serve_stdio(server: Any, *, drain_timeout: float, on_hup: Callable[[], None] | None = None) -> None:
    """Run ``server`` (a ``SidecarServer``) over stdin/stdout until EOF, SIGTERM or SIGINT (drained);
    SIGHUP runs ``on_hup`` on the event loop (the session goes on)."""
    from mcp.server.stdio import stdio_server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info(
                "received %s: no new calls; draining, then sealing the audit trail",
                signal.Signals(signum).name,
            )
        stop.set()

    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    fd = os.dup(0)  # the wire; fd 0 itself points at the null device while serving, as the SDK does
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    inflight = _InFlight()
    try:
        lines = _StdinLines(fd, inflight, stop, drain_timeout)
        async with stdio_server(stdin=cast(Any, lines)) as (read_stream, write_stream):
            await server.run_streams(read_stream, _CountingWriter(write_stream, inflight))
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
        if on_hup is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(OSError):
            os.dup2(fd, 0)  # `fd` stays open: the daemon reader may still be blocked on it
