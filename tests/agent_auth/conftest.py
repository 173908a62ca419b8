"""Fixtures for the agent-auth unit tests: a real test issuer and a static key source."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.testbed` is not importable under --import-mode=importlib otherwise
    sys.path.insert(0, _ROOT)

from mcp_fhir.agent_auth.errors import AgentAuthError  # noqa: E402
from tests.testbed.issuer import TestIssuer  # noqa: E402

AUDIENCE = "http://127.0.0.1:8765/mcp"


class StaticKeys:
    """A KeySource over a fixed JWKS document (no network), counting lookups."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self.keys = {k["kid"]: k for k in jwks["keys"]}
        self.lookups = 0

    async def get_key(self, kid: str) -> Mapping[str, Any]:
        self.lookups += 1
        if kid not in self.keys:
            raise AgentAuthError("unknown_kid")
        return self.keys[kid]


@pytest.fixture(scope="session")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(default_audience=AUDIENCE, algorithms=("RS256", "ES256", "RS384", "PS256")) as running:
        yield running


@pytest.fixture
def static_keys(issuer: TestIssuer) -> StaticKeys:
    return StaticKeys(issuer.public_jwks())
