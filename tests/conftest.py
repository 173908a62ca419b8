"""Shared fixtures: environment isolation, and the real OPA and FHIR test bed for integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEEP_ENV = ("MCP_FHIR_TEST_POSTGRES_DSN", "MCP_FHIR_TEST_REDIS_URL", "MCP_FHIR_OPA")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees another's MCP_FHIR_* settings."""
    for key in list(os.environ):
        if key.startswith("MCP_FHIR_") and key not in KEEP_ENV:
            monkeypatch.delenv(key, raising=False)


def require_env(name: str) -> str:
    """A service URL from the environment: skip locally when absent, fail in CI."""
    value = os.environ.get(name)
    if not value:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not set: .ci/run must start the service")
        pytest.skip(f'{name} is not set (run: eval "$(scripts/services.sh start)")')
    return value


@pytest.fixture
def postgres_dsn() -> str:
    """The test PostgreSQL (scripts/services.sh): skipped locally without it, a failure under CI."""
    return require_env("MCP_FHIR_TEST_POSTGRES_DSN")


@pytest.fixture
def redis_url() -> str:
    """The test Redis (scripts/services.sh): skipped locally without it, a failure under CI."""
    return require_env("MCP_FHIR_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def opa_binary() -> str:
    from mcp_fhir.policy.managed_opa import find_opa

    return find_opa()


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[object]:
    """One real FHIR R4 server (Medplum's router on Node 22), loaded with the synthetic data set."""
    from tests.testbed.fhir import start_fhir_server

    with start_fhir_server() as server:
        yield server
