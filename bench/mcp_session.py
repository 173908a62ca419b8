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

import httpx2

PROTOCOL_VERSION = "2025-06-18"
DEFAULT_CALL_TIMEOUT = 30.0  # seconds for one tools/call; a slower answer is an error in the cell
ACCEPT = "application/json, text/event-stream"


class McpSessionError(Exception):
    """The server broke the protocol or answered with an error; carries no response body."""


def _message_from(response: httpx2.Response, want_id: int) -> dict[str, Any]:
    """The JSON-RPC response with id `want_id`, from a JSON body or a POST-response SSE stream."""
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        message = response.json()
        if isinstance(message, dict) and message.get("id") == want_id:
            return message
        raise McpSessionError("unexpected JSON-RPC id")
    for line in response.text.splitlines():
        if not line.startswith("data:"):
            continue
        message = json.loads(line[5:].strip() or "null")
        if isinstance(message, dict) and message.get("id") == want_id:
            return message
    raise McpSessionError("no JSON-RPC response in the event stream")


class McpSession:
    """One MCP session: `await session.open()`, then `await session.call_tool(name, args)`."""

    def __init__(self, url: str, *, bearer: str | None = None, timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        self.url = url
        self._http = httpx2.AsyncClient(
            headers=headers,
            timeout=timeout,
            limits=httpx2.Limits(max_connections=1, max_keepalive_connections=1),
        )
        self._ids = itertools.count(1)
        self._session_id: str | None = None

    async def _rpc(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._ids)
        response = await self._http.post(
            self.url, json={"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        )
        if response.status_code != 200:
            raise McpSessionError(f"{method}: HTTP {response.status_code}")
        self._session_id = response.headers.get("mcp-session-id") or self._session_id
        message = _message_from(response, rid)
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
            self._http.headers["mcp-session-id"] = self._session_id
        self._http.headers["mcp-protocol-version"] = str(result.get("protocolVersion", PROTOCOL_VERSION))
        note = await self._http.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        if note.status_code not in (200, 202, 204):
            raise McpSessionError(f"notifications/initialized: HTTP {note.status_code}")
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
        await self._http.aclose()
