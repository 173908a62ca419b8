"""A lean MCP client session over streamable HTTP, for load generation.

The official `mcp.Client` is used once per server to check the call works (see `bench.run`), but
on a 2-core machine its per-call cost would make the load generator, not the server, the thing
measured. This session speaks the same protocol with less machinery: `initialize` (a
handshake-era revision, which the sidecar and the WSO2 peer both accept), `notifications/initialized`,
then `tools/call` requests on the session id the server issued, over one keep-alive connection.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import aiohttp

from bench.stats import BenchError

PROTOCOL_VERSION = "2025-06-18"
DEFAULT_CALL_TIMEOUT = 30.0  # seconds for one tools/call; a slower answer is an error in the cell
ACCEPT = "application/json, text/event-stream"


class McpSessionError(BenchError):
    """The server broke the protocol or answered with an error; carries no response body."""


def _message_from(content_type: str, text: str, want_id: int) -> dict[str, Any]:
    """The JSON-RPC response with id `want_id`, from a JSON body or a POST-response SSE stream."""
    if content_type.startswith("application/json"):
        message = json.loads(text)
        if isinstance(message, dict) and message.get("id") == want_id:
            return message
        raise McpSessionError("unexpected JSON-RPC id")
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        message = json.loads(line[5:].strip() or "null")
        if isinstance(message, dict) and message.get("id") == want_id:
            return message
    raise McpSessionError("no JSON-RPC response in the event stream")


class McpSession:
    """One MCP session: `await session.open()`, then `await session.call_tool(name, args)`.

    aiohttp, not httpx2: a load generator should spend as little of the machine as it can, and
    on this VM aiohttp costs about a quarter of httpx2's CPU per request (`python -m
    bench.http_clients`). The bare OPA and FHIR cells use the same client, so every ratio's
    numerator and denominator carry the same client cost.
    """

    def __init__(self, url: str, *, bearer: str | None = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        self.url = url
        self._headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
        if bearer:
            self._headers["Authorization"] = f"Bearer {bearer}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._http: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._session_id: str | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection per session
            self._http = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._http

    async def _post(self, payload: dict[str, Any]) -> tuple[int, str, str]:
        async with self._client().post(self.url, json=payload, headers=self._headers) as response:
            text = await response.text()
            session_id = response.headers.get("mcp-session-id")
            if session_id:
                self._session_id = session_id
            return response.status, response.headers.get("content-type", ""), text

    async def _rpc(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._ids)
        status, content_type, text = await self._post(
            {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        )
        if status != 200:
            raise McpSessionError(f"{method}: HTTP {status}")
        message = _message_from(content_type, text, rid)
        if "error" in message:
            raise McpSessionError(f"{method}: JSON-RPC error {message['error'].get('code')}")
        return message["result"]  # type: ignore[no-any-return]

    async def open(self) -> dict[str, Any]:
        result = await self._rpc(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-fhir-bench", "version": "1"},
            },
        )
        # The last response carries the session id; the SDK expects it on every later request.
        if self._session_id:
            self._headers["mcp-session-id"] = self._session_id
        self._headers["mcp-protocol-version"] = str(result.get("protocolVersion", PROTOCOL_VERSION))
        status, _, _ = await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if status not in (200, 202, 204):
            raise McpSessionError(f"notifications/initialized: HTTP {status}")
        return result

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The `CallToolResult` as a dict; raises `McpSessionError` if it is a tool error."""
        result = await self._rpc("tools/call", {"name": name, "arguments": arguments})
        if result.get("isError"):
            raise McpSessionError("the tool call returned isError")
        return result

    async def list_tools(self) -> list[dict[str, Any]]:
        return list((await self._rpc("tools/list", {})).get("tools", []))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
