"""Fixtures for the audit tests: records, trails on a temp dir, and the services guard."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import AuditTrail, build_trail
from mcp_fhir.audit.witness import FileWitness


def public_key_of(settings: AuditSettings) -> bytes:
    """The public half of the trail's signing key, as the operator pins it."""
    key = settings.signing_key_path
    return key.with_name(key.name + ".pub").read_bytes()


def witness_of(settings: AuditSettings) -> dict[str, Any] | None:
    """The witnessed head of a file or SQLite trail."""
    path = settings.witness_file("unused")
    assert path is not None
    return FileWitness(path).read()


def make_record(n: int = 0, **overrides: Any) -> AuditRecord:
    """A plausible access record; ``n`` varies the request id and the patient."""
    fields: dict[str, Any] = {
        "ts": f"2026-11-25T03:04:{n % 60:02d}.{n % 1000:03d}Z",
        "request_id": f"req-{n}",
        "trace_id": f"trace-{n}",
        "kind": "access",
        "subject_id": "agent-scribe",
        "on_behalf_of": "dr-jones",
        "authn": "oauth",
        "tool": "search_observations",
        "resource_type": "Observation",
        "operation": "search-type",
        "patient": f"pat-{n % 7}",
        "backend_patient": f"epic-{n % 7}",
        "backend": "epic",
        "scopes": ("patient/Observation.rs",),
        "purpose": "treatment",
        "result": "allowed",
        "reason_codes": (),
        "params": {"category": "laboratory", "_count": 20},
        "returned_count": 3,
        "filtered_count": 0,
        "cache": "miss",
        "decision_id": f"dec-{n}",
        "policy_revision": "rev-1",
        "decision_input": {"tool": "search_observations"},
    }
    fields.update(overrides)
    return AuditRecord(**fields)


@pytest.fixture
def record_factory() -> Callable[..., AuditRecord]:
    return make_record


@pytest.fixture
def file_settings(tmp_path: Path) -> AuditSettings:
    return AuditSettings(
        sink="file",
        path=str(tmp_path / "audit" / "audit.jsonl"),
        writer_id="test-writer",
    )


@pytest.fixture
async def file_trail(file_settings: AuditSettings) -> AsyncIterator[AuditTrail]:
    trail = build_trail(file_settings)
    await trail.start()
    try:
        yield trail
    finally:
        await trail.close()
