"""A fault-injection HTTP reverse proxy for tests, and a trivial echo upstream.

Put :class:`FaultProxy` on loopback between the sidecar and a real dependency (the FHIR test
server, the token endpoint, OPA) and make it misbehave on demand::

    with FaultProxy(upstream="http://127.0.0.1:8181") as proxy:    # proxy.url = http://127.0.0.1:<port>
        proxy.set_fault(Fault.status(500))                         # every request, until clear()
        proxy.set_fault(Fault.status(429, headers={"Retry-After": "1"}), times=3)  # the next 3 only
        proxy.clear()
        proxy.requests_seen, proxy.requests_forwarded

``async with FaultProxy(...)`` works too. Either way the proxy runs its own event loop in a
background thread, so it serves the code under test whichever loop that code runs on.

Faults: ``latency(s)`` (delay, then forward), ``reset()`` (TCP RST after reading the request),
``status(code, headers=, body=)`` (answer without forwarding), ``truncate(bytes=n)`` (forward,
then send the headers and only the first n body bytes and close), ``garbage()`` (a 200 whose
body is not JSON; ``garbage(raw=True)``: bytes that are not HTTP at all), ``json(body, status=)``
(a fixed JSON answer), ``down()`` (close the listening socket and every open connection: new
connections are refused until ``clear()``; ``times`` does not apply to it), ``trickle(every=s,
bytes=n)`` (forward, then send the headers at once and the body n bytes every s seconds, so that
no read ever waits long enough to time out while the whole body takes far longer).

``request_times`` holds the monotonic time at which each request was read, in order, so a test can
check when the code under test came back (after a Retry-After, for example).

The server side is a small HTTP/1.1 implementation on asyncio streams: keep-alive, Content-Length
and chunked request bodies. Requests are forwarded with one long-lived aiohttp session, method,
path, query, headers (except hop-by-hop ones and Host) and body unchanged; responses come back
with their status, headers and body bytes as the upstream sent them (not decompressed), re-framed
with a Content-Length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from yarl import URL

__all__ = ["DEFAULT_UPSTREAM_TIMEOUT", "EchoServer", "Fault", "FaultProxy"]

T = TypeVar("T")

DEFAULT_UPSTREAM_TIMEOUT = 30.0
DEFAULT_START_TIMEOUT = 10.0
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
GARBAGE_BODY = b'\x00\xff\xfe{"resourceType": Bundle <html>\x07garbage\x1b[0m'
_OPERATION_OUTCOME = json.dumps(
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
).encode()
_FRAMING = ("content-length", "transfer-encoding", "connection")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(frozen=True)
class Fault:
    """One way to misbehave. Build with the class methods."""

    kind: str
    delay: float = 0.0
    status_code: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    nbytes: int = 0
    raw: bool = False

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        return cls("latency", delay=seconds)

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def status(cls, code: int, headers: Mapping[str, str] | None = None, body: bytes | None = None) -> Fault:
        if body is None:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "transient"}],
            }
            body = json.dumps(outcome).encode() if code >= 400 else b""
            hdrs = (
                {"Content-Type": "application/fhir+json", **(headers or {})} if body else dict(headers or {})
            )
        else:
            hdrs = dict(headers or {})
        return cls("status", status_code=code, headers=tuple(hdrs.items()), body=body)

    @classmethod
    def truncate(cls, bytes: int = 20) -> Fault:
        return cls("truncate", nbytes=bytes)

    @classmethod
    def garbage(cls, raw: bool = False) -> Fault:
        return cls("garbage", raw=raw)

    @classmethod
    def trickle(cls, every: float = 0.5, bytes: int = 1) -> Fault:
        return cls("trickle", delay=every, nbytes=bytes)

    @classmethod
    def down(cls) -> Fault:
        return cls("down")

    @classmethod
    def json(cls, body: Any, status: int = 200) -> Fault:
        return cls(
            "status",
            status_code=status,
            headers=(("Content-Type", "application/json"),),
            body=json.dumps(body).encode(),
        )


class _LoopThread:
    """An asyncio loop in a daemon thread; ``run`` submits a coroutine and waits for it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_START_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(DEFAULT_START_TIMEOUT)
        self.loop.close()


class _BadRequest(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("head too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError as exc:
        raise _BadRequest("bad request line") from exc
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest("bad header")
        headers.append((name.strip(), value.strip()))
    request = _Request(method, target, version, headers, b"")
    if "chunked" in (request.header("transfer-encoding") or "").lower():
        request.body = await _read_chunked(reader)
    elif (length := request.header("content-length")) is not None:
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise _BadRequest("body too large")
        request.body = await reader.readexactly(size)
    return request


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(body) > MAX_BODY_BYTES:
            raise _BadRequest("body too large")


def _response_head(status: int, headers: list[tuple[str, str]], length: int | None) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [
        f"{k}: {v}"
        for k, v in headers
        if k.lower() not in ("content-length", "transfer-encoding", "connection")
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FaultProxy:
    """The fault-injection reverse proxy. See the module docstring."""

    def __init__(
        self, upstream: str, *, host: str = "127.0.0.1", upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = 0
        self._upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._remaining: int | None = None
        self._seen = 0
        self._forwarded = 0
        self._connections = 0
        self.request_times: list[float] = []
        self._thread: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = _LoopThread("fault-proxy")
        self._thread.run(self._start())
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._thread.run(self._stop())
        self._thread.stop()
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FaultProxy:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- faults --------------------------------------------------------------------------------
    def set_fault(self, fault: Fault, times: int | None = None) -> None:
        """Apply ``fault`` to every request (``times=None``) or to the next ``times`` requests."""
        with self._lock:
            self._fault, self._remaining = fault, times
        if fault.kind == "down":
            self._require_thread().run(self._go_down())

    def clear(self) -> None:
        with self._lock:
            was_down = self._fault is not None and self._fault.kind == "down"
            self._fault, self._remaining = None, None
        if was_down:
            self._require_thread().run(self._listen())

    @property
    def requests_seen(self) -> int:
        return self._seen

    @property
    def requests_forwarded(self) -> int:
        return self._forwarded

    @property
    def connections_accepted(self) -> int:
        return self._connections

    def _take_fault(self) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None or fault.kind == "down":
                return None
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._fault, self._remaining = None, None
            return fault

    def _require_thread(self) -> _LoopThread:
        if self._thread is None:
            raise RuntimeError("FaultProxy is not running")
        return self._thread

    # -- inside the proxy's loop ---------------------------------------------------------------
    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self._upstream_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _go_down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._abort_all()
            await self._server.wait_closed()
            self._server = None

    async def _stop(self) -> None:
        await self._go_down()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:  # connections still inside a latency fault
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._connections += 1
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except (_BadRequest, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    writer.write(_response_head(400, [], 0))
                    break
                if request is None:
                    break
                self._seen += 1
                self.request_times.append(time.monotonic())
                if not await self._respond(request, writer) or not request.keep_alive:
                    break
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection may carry another."""
        fault = self._take_fault()
        kind = fault.kind if fault else "pass"
        if fault is not None and kind == "latency":
            await asyncio.sleep(fault.delay)
        if fault is not None and kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault is not None and kind == "status":
            writer.write(_response_head(fault.status_code, list(fault.headers), len(fault.body)) + fault.body)
            await writer.drain()
            return True
        if fault is not None and kind == "garbage":
            if fault.raw:
                writer.write(GARBAGE_BODY + b"\r\n\r\n")
                await writer.drain()
                return False
            headers = [("Content-Type", "application/fhir+json")]
            writer.write(_response_head(200, headers, len(GARBAGE_BODY)) + GARBAGE_BODY)
            await writer.drain()
            return True
        status, headers, body = await self._forward(request)
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if fault is not None and kind == "trickle" and not no_body:
            writer.write(_response_head(status, headers, len(body)))
            step = max(1, fault.nbytes)
            for start in range(0, len(body), step):
                await writer.drain()
                await asyncio.sleep(fault.delay)  # the fault itself: a slow sender, not synchronisation
                writer.write(body[start : start + step])
            await writer.drain()
            return True
        if fault is not None and kind == "truncate":
            writer.write(_response_head(status, headers, len(body)) + body[: fault.nbytes])
            await writer.drain()
            return False
        length = None if no_body and request.method == "HEAD" else len(body)
        if request.method == "HEAD":
            upstream_length = next((v for k, v in headers if k.lower() == "content-length"), None)
            head = _response_head(status, headers, None)
            if upstream_length is not None:
                head = head[:-2] + f"Content-Length: {upstream_length}\r\n\r\n".encode()
            writer.write(head)
        else:
            writer.write(_response_head(status, headers, length) + (b"" if no_body else body))
        await writer.drain()
        return True

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if self._session is None:
            raise RuntimeError("FaultProxy session missing")
        headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP]
        present = {k.lower() for k, _ in headers}
        skip = [h for h in _AUTO_HEADERS if h.lower() not in present]
        self._forwarded += 1
        try:
            async with self._session.request(
                request.method,
                URL(self.upstream + request.target, encoded=True),
                headers=headers,
                data=request.body if request.body or request.method in ("POST", "PUT", "PATCH") else None,
                skip_auto_headers=skip,
                allow_redirects=False,
            ) as response:
                body = await response.read()
                return response.status, [(k.decode(), v.decode()) for k, v in response.raw_headers], body
        except (aiohttp.ClientError, TimeoutError):
            return 502, [("Content-Type", "text/plain")], b"fault proxy: upstream unreachable"


class EchoServer:
    """A trivial upstream on loopback: answers every request with a JSON echo of it.

    ``GET /chunked`` answers with a chunked body; ``GET /bytes/<n>`` with n bytes; any path
    under ``/status/<code>`` with that status.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.requests = 0
        self._thread: _LoopThread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> EchoServer:
        self._thread = _LoopThread("echo-server")
        self._thread.run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._thread.run(self._stop())
            self._thread.stop()
            self._thread = None

    async def _start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if request.path == "/chunked":
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        if request.path.startswith("/bytes/"):
            return web.Response(body=b"x" * int(request.path.rsplit("/", 1)[1]))
        status = int(request.path.split("/")[2]) if request.path.startswith("/status/") else 200
        echo = {
            "method": request.method,
            "path": request.path,
            "query_string": request.query_string,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body.decode("latin-1"),
        }
        return web.json_response(echo, status=status)
