"""One pooled HTTP session per backend, shared by fhirpy and everything else on the EHR path.

fhirpy's async client opens a new aiohttp session for every request: no keep-alive, a TLS
handshake per call. `PooledFHIRClient` keeps fhirpy's query building and resource model but
sends every request through one long-lived `httpx2.AsyncClient`, so connections are reused.
`send()` is the one seam where HTTP failures become `UpstreamError` leaves.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
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
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024  # a response larger than this is refused, not parsed


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed upstream answer: status, JSON body (or None), and the headers we act on."""

    status: int
    body: Any
    retry_after: str | None = None


def build_http_client(
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    verify: Any = True,
    cert: Any = None,
) -> httpx2.AsyncClient:
    """The pooled client for one backend: keep-alive, finite timeouts, verified TLS."""
    return httpx2.AsyncClient(
        timeout=httpx2.Timeout(read_timeout, connect=connect_timeout),
        limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        verify=verify,
        cert=cert,
        follow_redirects=False,
        headers={"Accept": "application/fhir+json"},
    )


def _parse(response: httpx2.Response, max_body: int) -> Response:
    raw = response.content
    if len(raw) > max_body:
        raise UpstreamBadResponse("the EHR response exceeded the size limit")
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if response.status_code < 400:
                raise UpstreamBadResponse("the EHR answered with a body that is not JSON") from exc
    return Response(response.status_code, body, response.headers.get("retry-after"))


async def send(
    http: httpx2.AsyncClient,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
) -> Response:
    """Send one request and translate every failure. 2xx and 3xx come back; the rest raise."""
    try:
        response = await http.request(method, url, json=json_body, headers=dict(headers or {}))
    except httpx2.TimeoutException as exc:
        raise UpstreamTimeout("the EHR did not answer in time") from exc
    except httpx2.TransportError as exc:
        # Resets, refused connections and bodies cut short (a truncated body is never partial data).
        raise UpstreamUnavailable("the EHR connection failed") from exc
    parsed = _parse(response, max_body)
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
        raise UpstreamUnavailable(f"the EHR failed (HTTP {status})", status=status)
    raise UpstreamRejected(f"the EHR refused the request (HTTP {status})", status=status)


Sender = Callable[[str, str, Any, Mapping[str, str]], Awaitable[Response]]


class PooledFHIRClient(AsyncFHIRClient):
    """fhirpy's async client, with every request sent through the caller's pooled `Sender`."""

    def __init__(self, url: str, sender: Sender) -> None:
        super().__init__(url)
        self._sender = sender

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
        url = self._build_request_url(path, params)
        headers = {"Content-Type": "application/fhir+json"} if data is not None else {}
        headers.update(extra_headers or {})
        response = await self._sender(method.upper(), url, data, headers)
        # Plain dicts, not fhirpy's AttrDict: we read bundles ourselves and skip a second parse.
        return (response.body, response.status) if returning_status else response.body
