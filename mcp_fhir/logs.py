"""Structured JSON logs with request and trace ids, on structlog; never PHI, tokens or secrets.

One JSON object per line on stderr::

    {"ts": "...Z", "level": "info", "logger": "mcp_fhir.http", "msg": "request",
     "request_id": "9f...", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "method": "POST",
     "route": "/mcp", "status": 200, "duration_ms": 4.2}

structlog does the plumbing: ``structlog.stdlib.ProcessorFormatter`` formats every stdlib
record (ours and the libraries'), ``ExtraAdder`` lifts the allow-listed ``extra=`` fields,
``structlog.contextvars`` carries the request and trace ids, and ``JSONRenderer`` writes the
line. ``structlog.get_logger()`` loggers go through the same chain (``configure_logging``).
What stays ours is the redaction, as processors:

* log calls pass identifiers through ``extra=`` (or structlog keyword arguments); only the keys
  on ``ALLOWED_EXTRAS`` (tool, backend, code, ids, status ...) are kept, everything else dropped;
* message text never interpolates values that could carry PHI. As a last line of defence,
  ``redact()`` replaces anything shaped like a bearer token, JWT, API key or PEM block;
* an exception is logged by its type only: no traceback, no ``str(exc)``;
* the request middleware logs the matched route (``/mcp``, ``/readyz`` ...), never a query string.

Cost, measured on the 2-core build machine (one access-log line, 20 000 formats, best of 5):
the hand-written formatter this replaced took 32 µs a line, this chain 69 µs. One line per HTTP
request, against a request of several milliseconds, is well inside the bench's noise.

``RequestContextMiddleware`` gives every HTTP request a ``request_id`` (``X-Request-Id`` when it is a
safe token, else a fresh one, echoed in the response) and a ``trace_id`` (from a W3C ``traceparent``
header, else a fresh one); every log line written while the request runs carries both.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "ALLOWED_EXTRAS",
    "KNOWN_ROUTES",
    "JsonFormatter",
    "RequestContextMiddleware",
    "bind_request",
    "configure_logging",
    "current_ids",
    "redact",
]

ALLOWED_EXTRAS = frozenset(
    {
        "request_id",
        "trace_id",
        "tool",
        "backend",
        "code",
        "result",
        "decision_id",
        "alert",
        "method",
        "route",
        "status",
        "duration_ms",
    }
)
KNOWN_ROUTES = frozenset(
    {"/healthz", "/readyz", "/metrics", "/.well-known/jwks.json", "/.well-known/oauth-protected-resource"}
)
MAX_MESSAGE_CHARS = 2_000  # a log line is a pointer, not a payload
REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
NOISY_LOGGERS = ("httpx2", "httpcore", "httpcore2", "uvicorn.access", "mcp", "aiohttp")
_HEAD = ("ts", "level", "logger", "msg", "request_id", "trace_id")

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_SECRET_SHAPES = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),  # a JWS compact token
    re.compile(r"\bmfk_[A-Za-z0-9_-]{8,}"),  # our API keys
    re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.DOTALL),
    re.compile(r"(?i)\b(client_secret|password|access_token|refresh_token)=[^&\s]+"),
)


def redact(text: str) -> str:
    """Replace anything shaped like a credential with ``[secure]`` and bound the length."""
    for shape in _SECRET_SHAPES:
        text = shape.sub("[secure]", text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "…"


def current_ids() -> tuple[str | None, str | None]:
    """The (request_id, trace_id) of the request being served, if any."""
    bound = structlog.contextvars.get_contextvars()
    return bound.get("request_id"), bound.get("trace_id")


@contextmanager
def bind_request(request_id: str | None = None, trace_id: str | None = None) -> Iterator[tuple[str, str]]:
    """Every log line inside carries these ids (fresh ones when not given)."""
    rid = request_id or uuid.uuid4().hex
    tid = trace_id or uuid.uuid4().hex
    tokens = structlog.contextvars.bind_contextvars(request_id=rid, trace_id=tid)
    try:
        yield rid, tid
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


# ---- the processors that are ours: time from the record, exception type, allow-list, redaction ----


def _timestamp(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    record = event.get("_record")
    created = record.created if isinstance(record, logging.LogRecord) else time.time()
    event["ts"] = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"
    )
    return event


def _exception_type(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """An exception by its type only: no traceback, no values."""
    exc_info = event.pop("exc_info", None)
    event.pop("stack_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        event["error"] = type(exc_info).__name__
    elif isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        event["error"] = exc_info[0].__name__
    return event


def _allow_list_and_redact(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Only the fixed head, the allow-listed extras and the error type survive; strings are redacted."""
    out: EventDict = {}
    for key in (*_HEAD, *sorted(ALLOWED_EXTRAS - set(_HEAD)), "error"):
        if key in event:
            value = event[key]
            out[key] = redact(value) if isinstance(value, str) else value
    return out


def _safe_default(value: Any) -> str:
    return type(value).__name__  # an object we did not expect is named, never printed


_SHARED: tuple[Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.stdlib.ExtraAdder(allow=tuple(sorted(ALLOWED_EXTRAS))),
    _timestamp,
    _exception_type,
    structlog.processors.EventRenamer("msg"),
    _allow_list_and_redact,
)


def _drop_meta(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    event.pop("_record", None)  # added by ProcessorFormatter to a structlog event after the allow-list
    event.pop("_from_structlog", None)
    return event


_RENDER: tuple[Processor, ...] = (
    _drop_meta,
    structlog.processors.JSONRenderer(serializer=json.dumps, ensure_ascii=False, default=_safe_default),
)


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """One JSON object per record: timestamp, level, logger, message, allow-listed extras, ids."""

    def __init__(self) -> None:
        super().__init__(processors=[*_RENDER], foreign_pre_chain=[*_SHARED], use_get_message=True)

    def format(self, record: logging.LogRecord) -> str:
        if not isinstance(record.msg, dict):  # a stdlib record, not one structlog wrapped
            try:
                record.getMessage()
            except (TypeError, ValueError):  # a bad format string must not lose the line, nor leak its args
                record = logging.makeLogRecord({**record.__dict__, "msg": str(record.msg), "args": ()})
        return super().format(record)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stderr (or `stream`) for the whole process; third-party chatter at WARNING.

    Stdlib loggers and ``structlog.get_logger()`` loggers write through the same chain.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_access = logging.getLogger("mcp_fhir.http")


class RequestContextMiddleware:
    """Pure ASGI: bind a request id and trace id to each HTTP request and log one line when it ends."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], mcp_path: str = "/mcp"
    ) -> None:
        self.app = app
        self.routes = KNOWN_ROUTES | {mcp_path}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        offered = headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _SAFE_REQUEST_ID.match(offered) else None
        parent = _TRACEPARENT.match(headers.get(TRACEPARENT_HEADER, ""))
        status = {"code": 500}
        started = time.perf_counter()
        with bind_request(request_id, parent.group(1) if parent else None) as (rid, _tid):

            async def send_with_id(message: MutableMapping[str, Any]) -> None:
                if message.get("type") == "http.response.start":
                    status["code"] = int(message.get("status", 500))
                    message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
                await send(message)

            try:
                await self.app(scope, receive, send_with_id)
            finally:
                _access.info(
                    "request",
                    extra={
                        "method": str(scope.get("method", "")),
                        "route": self._route(str(scope.get("path", ""))),
                        "status": status["code"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )

    def _route(self, path: str) -> str:
        """A path from a fixed set: anything else (which could carry an id) is logged as `(other)`."""
        trimmed = path.rstrip("/") or "/"
        if trimmed in self.routes:
            return trimmed
        for route in self.routes:
            if trimmed.startswith(route + "/") and route.startswith("/.well-known"):
                return route
        return "(other)"
