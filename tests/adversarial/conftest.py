"""Shared fixtures for the adversarial suite: one real OPA for the session, the real FHIR test bed,
and helpers that drive `build_server(settings)` through the official MCP client and read the audit file."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_fhir import config
from mcp_fhir.policy.managed_opa import ManagedOpa
from mcp_fhir.server import build_server
from tests.testbed.sidecar import POLICIES, sidecar_config

AUDIT_FILE = "audit.jsonl"


def require_service(name: str) -> str:
    """A service URL from the environment: skip locally when absent, fail when `CI` is set."""
    value = os.environ.get(name)
    if not value:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not set: CI must start the service")
        pytest.skip(f'{name} is not set (run: eval "$(scripts/services.sh start)")')
    return value


@pytest.fixture(scope="session")
async def opa_url(opa_binary: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """One real OPA with the shipped policies and decision logging on (so decisions carry ids)."""
    log = tmp_path_factory.mktemp("opa") / "decisions.log"
    opa = ManagedOpa([POLICIES], binary=opa_binary, decision_log=log)
    await opa.start()
    try:
        yield opa.url
    finally:
        await opa.stop()


def audit_records(workdir: Path, kind: str | None = "access") -> list[dict[str, Any]]:
    """Every record in the audit file under `workdir` (of one `kind`, by default `access`)."""
    path = workdir / AUDIT_FILE
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [line["record"] for line in lines if "record" in line]
    return [r for r in records if kind is None or r.get("kind") == kind]


def tool_error(result: Any) -> dict[str, Any]:
    """The JSON body of a tool error (or the `data` of an MCP error); fails the test on a result."""
    if isinstance(result, MCPError):
        return dict(result.error.data or {"code": f"jsonrpc_{result.error.code}"})
    if not result.is_error:
        raise AssertionError("expected a tool error, got a result")
    return json.loads(result.content[0].text)


async def attempt(client: Client, tool: str, args: dict[str, Any]) -> Any:
    """Call a tool; an MCP (protocol or infrastructure) error is returned, not raised."""
    try:
        return await client.call_tool(tool, args)
    except MCPError as exc:
        return exc


@dataclass
class Sidecar:
    """One in-process sidecar: its client and its working directory (audit, idmap)."""

    client: Client
    workdir: Path

    def audit(self, kind: str | None = "access") -> list[dict[str, Any]]:
        return audit_records(self.workdir, kind)


@asynccontextmanager
async def sidecar(
    workdir: Path, fhir_base_url: str, opa: str, identity: dict[str, Any], **overrides: Any
) -> AsyncIterator[Sidecar]:
    """`build_server` over the test bed with `identity` as the local caller, driven by `mcp.Client`."""
    settings = config.from_mapping(
        sidecar_config(workdir, fhir_base_url, opa_url=opa, identity=identity, **overrides)
    )
    async with Client(build_server(settings)) as client:
        yield Sidecar(client, workdir)


def identity(
    name: str, claims: dict[str, Any], scopes: list[str] | tuple[str, ...] = ("user/*.rs",)
) -> dict[str, Any]:
    """A local identity with raw claims: the policy, not Python, decides what they mean."""
    return {"id": name, "claims": {"sub": name, **claims}, "scopes": list(scopes)}
