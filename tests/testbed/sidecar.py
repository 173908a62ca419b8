"""Build sidecar configurations over the real test bed, for tests, the demo and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mcp_fhir import config
from mcp_fhir.config import Settings
from tests.testbed import data

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"

# Identities the tests and demo use. Claims are raw: the policy derives roles from them.
CLINICIAN = {
    "id": "agent-clinician",
    "claims": {"roles": ["clinician"], "sub": "agent-clinician"},
    "scopes": ["user/*.rs", "user/DocumentReference.c"],
}
NURSE = {
    "id": "agent-nurse",
    "claims": {"roles": ["nurse"], "sub": "agent-nurse"},
    "scopes": ["user/Patient.rs", "user/Observation.rs"],
}
AUDITOR = {
    "id": "agent-auditor",
    "claims": {"roles": ["auditor"], "sub": "agent-auditor"},
    "scopes": ["user/AuditEvent.rs"],
}


def idmap_seed(path: Path, backend: str = "testbed") -> Path:
    """Canonical ids for every test-bed patient (the test bed uses them as its FHIR ids too)."""
    entries = [{"canonical": pid, "ids": {backend: {"fhir_id": pid}}} for pid in sorted(data.PATIENTS)]
    path.write_text(yaml.safe_dump(entries), encoding="utf-8")
    return path


def sidecar_config(
    workdir: Path,
    fhir_base_url: str,
    *,
    opa_url: str | None = None,
    identity: dict[str, Any] | None = None,
    transport: str = "stdio",
    **overrides: Any,
) -> dict[str, Any]:
    """A complete config mapping: the test bed as backend `testbed`, audit under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "server": {"transport": transport},
        "auth": {"local": dict(identity or CLINICIAN)},
        "opa": {
            "url": opa_url,
            "policies": str(POLICIES),
            "decision_log": str(workdir / "opa-decisions.log"),
        },
        "backends": {"testbed": {"base_url": fhir_base_url}},
        "idmap": {
            "kind": "sqlite",
            "path": str(workdir / "idmap.db"),
            "seed_file": str(idmap_seed(workdir / "idmap.yaml")),
        },
        "audit": {"sink": "file", "path": str(workdir / "audit.jsonl")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def settings_for(workdir: Path, fhir_base_url: str, **kw: Any) -> Settings:
    return config.from_mapping(sidecar_config(workdir, fhir_base_url, **kw))
