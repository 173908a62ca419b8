"""The streamable HTTP app: the SDK's MCP endpoint, guarded, plus health and our public JWKS.

Also what `serve` needs around it as an operator sees it:

* `header_limited_protocol(parser)`: uvicorn's HTTP protocol (h11 or httptools) with a bound on a
  request's line and header fields, `MAX_REQUEST_HEADER_BYTES`. A request over it is answered
  `431 Request Header Fields Too Large` and its connection closed, before any of it reaches the app.
  uvicorn has no such setting for httptools and answers h11's overflow with a 400, so the two
  protocol classes are subclassed here (the smallest hook that gives the RFC 6585 status).
* `reload(...)`: what SIGHUP does: read the config file again, swap in its API keys, restart the
  managed OPA so it reads its policy and data files again, and take the new `opa.expected_revision`.
  A new config that does not validate is refused and the running one kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from mcp_fhir import config
from mcp_fhir._exceptions import MCPFhirError
from mcp_fhir.agent_auth.api_keys import ApiKeyStore
from mcp_fhir.agent_auth.http import protect_http_app, transport_security_for
from mcp_fhir.config import Settings
from mcp_fhir.ehr.keys import public_jwks
from mcp_fhir.ehr.smart import SmartBackendAuth
from mcp_fhir.health import BackendProbes, readiness
from mcp_fhir.logs import RequestContextMiddleware
from mcp_fhir.server import SidecarServer, publish_build_info

log = logging.getLogger("mcp_fhir.serve")

MAX_REQUEST_HEADER_BYTES = 32 * 1024  # request line and every header field, together
LINGER_SECONDS = 2.0  # after a 431, read and drop what the client still sends, then close
LINGER_MAX_BYTES = 8 * 1024 * 1024
_431 = b"Request header fields too large"
_431_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_431)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _431
)


@dataclass
class ServeState:
    """What a reload may change while `serve` runs: the settings readiness reads."""

    settings: Settings
    config_path: str | None = None
    probes: BackendProbes = field(default_factory=BackendProbes)
    reloads: int = 0


def build_http_app(settings: Settings, server: SidecarServer, state: ServeState | None = None) -> Any:
    """The ASGI app `serve` runs: Origin/Host checks, no tokens in query strings, health and JWKS routes."""
    holder = server.app_holder
    state = state or ServeState(settings)

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    @server.custom_route("/readyz", methods=["GET"])
    async def readyz(request: Request) -> JSONResponse:
        report = await readiness(
            holder.get("app"), expected_revision=state.settings.opa.expected_revision, probes=state.probes
        )
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @server.custom_route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(request: Request) -> JSONResponse:
        """Our SMART Backend Services public keys, for the EHR to register."""
        app = holder.get("app")
        keys: dict[str, Any] = {"keys": []}
        for client in app.backends.values() if app else ():
            tokens = getattr(client, "token_provider", None)
            if isinstance(tokens, SmartBackendAuth):
                keys["keys"] += tokens.public_jwks()["keys"]
        return JSONResponse(keys)

    app: Any = server.streamable_http_app(
        streamable_http_path=settings.server.path,
        stateless_http=settings.server.stateless,
        json_response=settings.server.json_response,
        transport_security=transport_security_for(
            settings.server.host,
            settings.server.port,
            settings.server.allowed_origins,
            settings.server.allowed_hosts,
        ),
        host=settings.server.host,
    )
    on_reject = server.on_reject
    if on_reject:
        app = protect_http_app(app, on_reject, protected_paths=[settings.server.path])
    return RequestContextMiddleware(app, mcp_path=settings.server.path)


# --- SIGHUP ---------------------------------------------------------------------------------------

# Sections a reload does not apply (logged by name when they changed); `auth` is compared without its API keys.
RESTART_ONLY = (
    "server",
    "backends",
    "default_backend",
    "tools",
    "idmap",
    "audit",
    "cache",
    "rate_limit",
    "limits",
    "flag_prompt_injection",
)


async def reload(server: SidecarServer, state: ServeState) -> bool:
    """Re-read the config file: new API keys, a restarted managed OPA, the new expected revision.

    Returns False (and keeps everything as it was) when the new file does not validate. Settings that
    only a restart applies are logged by section name.
    """
    try:
        new = config.load(state.config_path)
        auth = new.agent_auth()
    except MCPFhirError as exc:
        log.error("reload refused, the running configuration is kept: %s (%s)", exc.code, exc)
        return False
    verifier = server.ops.get("token_verifier")
    if verifier is not None:
        verifier.replace_api_keys(ApiKeyStore(auth.api_keys) if auth.api_keys else None)
    managed = server.ops.get("managed_opa")
    if managed is not None:
        try:
            await managed.reload()
        except (MCPFhirError, TimeoutError) as exc:
            log.error("reload: the managed OPA did not come back (%s); it is supervised", type(exc).__name__)
    app = server.app_holder.get("app")
    if app is not None:
        # Policy files read again may decide otherwise under the same (file) revision: forget every decision.
        app.decider.forget_decisions()
        await publish_build_info(app.engine, new, managed)
    changed = restart_only_changes(state.settings, new)
    if changed:
        log.warning("reload: changes to %s take effect at the next restart", ", ".join(changed))
    state.settings = new
    state.reloads += 1
    log.warning("reload: API keys (%d) and policy data reloaded", len(auth.api_keys))
    return True


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """The sections that differ between `old` and `new` and that only a restart applies."""
    changed = [name for name in RESTART_ONLY if _section(old, name) != _section(new, name)]
    if dataclasses.replace(old.agent_auth(), api_keys=()) != dataclasses.replace(
        new.agent_auth(), api_keys=()
    ):
        changed.append("auth (other than api_keys)")
    if old.opa.model_dump(exclude={"expected_revision"}) != new.opa.model_dump(exclude={"expected_revision"}):
        changed.append("opa (other than expected_revision)")
    return changed


def _section(settings: Settings, name: str) -> Any:
    value = getattr(settings, name, None)
    dump = getattr(value, "model_dump", None)
    return dump() if dump is not None else value


def reload_on_signal(server: SidecarServer, state: ServeState) -> Callable[[], None]:
    """A callback for the event loop: one reload at a time; a signal during a reload runs one more after it."""
    running: dict[str, Any] = {"task": None, "again": False}

    def fire() -> None:
        task = running["task"]
        if task is not None and not task.done():
            running["again"] = True
            return

        async def run() -> None:
            while True:
                running["again"] = False
                await reload(server, state)
                if not running["again"]:
                    return

        running["task"] = asyncio.get_running_loop().create_task(run())

    return fire


# --- request header limits ------------------------------------------------------------------------


class _Rejecting:
    """The 431 answer, then a lingering close: drop what the client still sends, for a bounded time and size.

    Closing at once with unread data makes the kernel send a reset, and the client never reads the 431.
    """

    transport: asyncio.Transport
    _rejected: bool = False
    _dropped: int = 0

    def _reject_headers(self) -> None:
        self._rejected = True
        self.transport.write(_431_RESPONSE)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)
        log.warning("request headers over %d bytes: 431", MAX_REQUEST_HEADER_BYTES)

    def _drop(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_MAX_BYTES:
            self.transport.close()


class H11HeaderLimited(_Rejecting, H11Protocol):
    """h11, whose own bound on an incomplete request head (`max_incomplete_event_size`) answers 431."""

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEADER_BYTES)
        self._hint = 400
        next_event = self.conn.next_event

        def next_event_noting_the_status() -> Any:
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._hint = exc.error_status_hint
                raise

        self.conn.next_event = next_event_noting_the_status  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            self._drop(data)
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self._hint == 431:
            self._reject_headers()
        else:
            super().send_400_response(msg)


def _httptools_class() -> type[Any] | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HttptoolsHeaderLimited(_Rejecting, HttpToolsProtocol):  # type: ignore[misc, valid-type]
        """httptools (llhttp), which has no bound of its own: count the bytes fed while no body is expected."""

        _head_bytes = 0
        _in_body = False

        def data_received(self, data: bytes) -> None:
            if self._rejected:
                self._drop(data)
                return
            if not self._in_body:
                room = MAX_REQUEST_HEADER_BYTES - self._head_bytes
                if len(data) > room:
                    super().data_received(data[:room])  # the head may end inside the room
                    if self._rejected or self.transport.is_closing():
                        return
                    if not self._in_body:
                        self._reject_headers()
                        return
                    data = data[room:]
                else:
                    self._head_bytes += len(data)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_body = True
            self._head_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body = False
            super().on_message_complete()

    return HttptoolsHeaderLimited


HttptoolsHeaderLimited = _httptools_class()


def header_limited_protocol(parser: str) -> type[Any]:
    """uvicorn's `http` protocol class for the configured parser ("auto" prefers httptools), header-limited."""
    if parser in ("auto", "httptools") and HttptoolsHeaderLimited is not None:
        return HttptoolsHeaderLimited
    return H11HeaderLimited


__all__ = [
    "MAX_REQUEST_HEADER_BYTES",
    "ServeState",
    "build_http_app",
    "header_limited_protocol",
    "public_jwks",
    "reload",
    "reload_on_signal",
]
