"""Structured JSON logs with request and trace ids; never PHI, tokens or secrets.

One JSON object per line on stderr::

    {"ts": "...Z", "level": "info", "logger": "mcp_fhir.http", "msg": "request",
     "request_id": "9f...", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "method": "POST",
     "route": "/mcp", "status": 200, "duration_ms": 4.2}

How PHI and secrets stay out, by construction:

* log calls pass identifiers through ``extra=``; the formatter keeps only the keys on
  ``ALLOWED_EXTRAS`` (tool, backend, code, ids, status ...) and drops everything else;
* message text never interpolates values that could carry PHI. As a last line of defence,
  ``redact()`` replaces anything shaped like a bearer token, JWT, API key or PEM block;
* an exception is logged by its type only: no traceback, no ``str(exc)``;
* the request middleware logs the matched route (``/mcp``, ``/readyz`` ...), never a query string.

``RequestContextMiddleware`` gives every HTTP request a ``request_id`` (``X-Request-Id`` when it is a
safe token, else a fresh one, echoed in the response) and a ``trace_id`` (from a W3C ``traceparent``
header, else a fresh one); every log line written while the request runs carries both.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

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

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mcp_fhir_request_id", default=None)
_TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mcp_fhir_trace_id", default=None)
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
    return _REQUEST_ID.get(), _TRACE_ID.get()


@contextmanager
def bind_request(request_id: str | None = None, trace_id: str | None = None) -> Iterator[tuple[str, str]]:
    """Every log line inside carries these ids (fresh ones when not given)."""
    rid = request_id or uuid.uuid4().hex
    tid = trace_id or uuid.uuid4().hex
    t1, t2 = _REQUEST_ID.set(rid), _TRACE_ID.set(tid)
    try:
        yield rid, tid
    finally:
        _TRACE_ID.reset(t2)
        _REQUEST_ID.reset(t1)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, allow-listed extras, ids."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(_message(record)),
        }
        request_id, trace_id = current_ids()
        if request_id is not None:
            out["request_id"] = request_id
        if trace_id is not None:
            out["trace_id"] = trace_id
        for key in sorted(ALLOWED_EXTRAS):
            if key in record.__dict__:
                value = record.__dict__[key]
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__  # the type only: no traceback, no values
        return json.dumps(out, ensure_ascii=False, default=lambda v: type(v).__name__)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # a bad format string must not lose the line, nor leak its args
        return str(record.msg)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """JSON lines on stderr (or `stream`) for the whole process; third-party chatter at WARNING."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
