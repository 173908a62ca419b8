"""One pooled HTTP session per backend, shared by fhirpy and everything else on the EHR path.

fhirpy's async client opens a new aiohttp session for every request: no keep-alive, a TLS
handshake per call. `PooledFHIRClient` keeps fhirpy's query building and resource model but
sends every request through one long-lived session, so connections are reused.

    EhrHttp (Protocol)      request() one exchange, aclose()
    ├── AiohttpEhrHttp      the real one: one aiohttp session, keep-alive, finite timeouts, verified TLS
    └── FakeEhrHttp         in-package fake for unit tests: answers with a function, keeps every request

The EHR path uses aiohttp, not httpx2 (the rest of the stack's client): on the same FHIR read it
costs about a quarter of httpx2's CPU and half its wall time (`python -m bench.http_clients`,
`docs/performance.md`), and the sidecar already carries aiohttp for OPA. `AiohttpEhrHttp.request`
is the one place where aiohttp failures become `UpstreamError` leaves; `send()` turns HTTP statuses
into them.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from fhirpy import AsyncFHIRClient

from mcp_fhir._exceptions import (
    ResourceNotFound,
    UpstreamAuthError,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 15.0
DEFAULT_TOTAL_TIMEOUT = 30.0  # one request in all: connect, send, headers and the whole body
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # a response larger than this is refused, not parsed
READ_CHUNK_BYTES = 64 * 1024
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed upstream answer: status, JSON body (or None), and the headers we act on."""

    status: int
    body: Any
    retry_after: str | None = None


class EhrHttp(Protocol):
    """One HTTP exchange with the EHR. Transport failures raise `UpstreamError` leaves; statuses do not."""

    async def request(
        self, method: str, url: str, *, json_body: Any, headers: Mapping[str, str], max_body: int
    ) -> Response: ...

    async def aclose(self) -> None: ...


def _parse(status: int, raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if status < 400:
            raise UpstreamBadResponse("the EHR answered with a body that is not JSON") from exc
    return None


class AiohttpEhrHttp:
    """The pooled session for one backend: keep-alive, finite timeouts, verified TLS, no redirects.

    Three timeouts: ``connect_timeout``, ``read_timeout`` (the longest silence between two reads)
    and ``total_timeout``, the deadline of the whole exchange, body included, so that a body
    trickled a few bytes at a time cannot hold a call for longer. Each raises ``UpstreamTimeout``.

    The aiohttp session is opened on first use, inside the running event loop. Proxy variables in the
    environment are ignored, as for the SMART token client: credentials go only where configured.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if connect_timeout <= 0 or read_timeout <= 0 or total_timeout <= 0 or max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")
        self._total = total_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=self._ssl if self._ssl is not None else True
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers={"Accept": FHIR_JSON}, trust_env=False
            )
        return self._session

    async def request(
        self, method: str, url: str, *, json_body: Any, headers: Mapping[str, str], max_body: int
    ) -> Response:
        data = None if json_body is None else json.dumps(json_body).encode()
        try:
            async with (
                asyncio.timeout(self._total),
                self._client().request(
                    method, url, data=data, headers=headers, allow_redirects=False
                ) as response,
            ):
                if response.content_length is not None and response.content_length > max_body:
                    raise UpstreamBadResponse("the EHR response exceeded the size limit")
                raw = bytearray()
                async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                    raw += chunk
                    if len(raw) > max_body:
                        raise UpstreamBadResponse("the EHR response exceeded the size limit")
                status, retry_after = response.status, response.headers.get("Retry-After")
        except TimeoutError as exc:  # before OSError: asyncio's timeouts are TimeoutError, an OSError
            raise UpstreamTimeout("the EHR did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            # Resets, refused connections and bodies cut short (a truncated body is never partial data).
            raise UpstreamUnavailable("the EHR connection failed") from exc
        return Response(status, _parse(status, bytes(raw)), retry_after)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@dataclass(frozen=True, slots=True)
class SentRequest:
    """One request a `FakeEhrHttp` received."""

    method: str
    url: str
    json: Any
    headers: Mapping[str, str]


@dataclass
class FakeEhrHttp:
    """An in-package fake for unit tests: answers with `respond(request)` and keeps every request."""

    respond: Callable[[SentRequest], Response] = field(default=lambda r: Response(200, None))
    requests: list[SentRequest] = field(default_factory=list)
    closed: bool = False

    async def request(
        self, method: str, url: str, *, json_body: Any, headers: Mapping[str, str], max_body: int
    ) -> Response:
        sent = SentRequest(method, url, json_body, dict(headers))
        self.requests.append(sent)
        return self.respond(sent)

    async def aclose(self) -> None:
        self.closed = True


def build_http_client(
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ssl_context: ssl.SSLContext | None = None,
) -> AiohttpEhrHttp:
    """The pooled client for one backend: keep-alive, finite timeouts, verified TLS."""
    return AiohttpEhrHttp(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        total_timeout=total_timeout,
        max_connections=max_connections,
        ssl_context=ssl_context,
    )


async def send(
    http: EhrHttp,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
) -> Response:
    """Send one request and translate every failure. 2xx and 3xx come back; the rest raise."""
    parsed = await http.request(method, url, json_body=json_body, headers=headers or {}, max_body=max_body)
    status = parsed.status
    if status < 400:
        return parsed
    if status == 401:
        raise UpstreamAuthError("the EHR refused the sidecar's credentials (HTTP 401)", status=status)
    if status == 429:
        err = UpstreamRateLimited("the EHR rate limit was reached (HTTP 429)", status=status)
        err.retry_after = parsed.retry_after
        raise err
    if status in (404, 410):
        raise ResourceNotFound("the EHR has no such resource", status=status)
    if status >= 500:
        failed = UpstreamUnavailable(f"the EHR failed (HTTP {status})", status=status)
        failed.retry_after = parsed.retry_after  # a 503 may say when to come back, as a 429 does
        raise failed
    raise UpstreamRejected(f"the EHR refused the request (HTTP {status})", status=status)


Sender = Callable[[str, str, Any, Mapping[str, str]], Awaitable[Response]]


class PooledFHIRClient(AsyncFHIRClient):
    """fhirpy's async client, with every request sent through the caller's pooled `Sender`."""

    def __init__(self, url: str, sender: Sender) -> None:
        super().__init__(url)
        self._sender = sender

    async def request(
        self,
        method: str,
        path: str,
        *,
        data: dict | None = None,
        params: dict | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[Any, int]:
        """One FHIR interaction through the pooled sender: the parsed body and the HTTP status."""
        url = self._build_request_url(path, params)
        sent = {"Content-Type": "application/fhir+json"} if data is not None else {}
        sent.update(headers or {})
        response = await self._sender(method.upper(), url, data, sent)
        # Plain dicts, not fhirpy's AttrDict: we read bundles ourselves and skip a second parse.
        return response.body, response.status

    async def _do_request(  # type: ignore[override]
        self,
        method: str,
        path: str,
        data: dict | None = None,
        params: dict | None = None,
        extra_headers: dict | None = None,
        *,
        returning_status: bool = False,
    ) -> Any:
        # fhirpy's own calls (searches, `execute`) come through here; ours use `request`.
        body, status = await self.request(method, path, data=data, params=params, headers=extra_headers)
        return (body, status) if returning_status else body
