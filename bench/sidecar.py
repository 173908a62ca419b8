"""The benchmarked sidecar: its config over the test bed, and one MCP stream of calls to it.

Shared by `bench.run` and `bench.scaleout`, so that neither imports the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench.load import Op
from bench.mcp_session import McpSession

PATIENT = "pat-au-001"
PURPOSE = "treatment"


def sidecar_cfg(
    workdir: Path,
    fhir_url: str,
    opa_url: str,
    key_hash: str,
    port: int,
    *,
    server: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """An HTTP sidecar config over the test bed, authenticated by one API key (the nurse's claims)."""
    from tests.testbed.sidecar import NURSE, sidecar_config

    cfg = sidecar_config(
        workdir,
        fhir_url,
        opa_url=opa_url,
        identity=NURSE,
        transport="http",
        server={**(server or {}), "transport": "http", "host": "127.0.0.1", "port": port},
        **overrides,
    )
    cfg["auth"] = {
        "api_keys": [
            {"id": "bench-agent", "hash": key_hash, "claims": NURSE["claims"], "scopes": NURSE["scopes"]}
        ]
    }
    return cfg


@asynccontextmanager
async def mcp_stream(url: str, bearer: str | None, tool: str, arguments: dict[str, Any]) -> AsyncIterator[Op]:
    session = McpSession(url, bearer=bearer)
    try:
        await session.open()
        yield lambda: session.call_tool(tool, arguments)
    finally:
        await session.aclose()
