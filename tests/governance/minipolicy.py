"""A small, self-contained policy tree for governance tests, in a throwaway git repository.

It follows the shipped policy's conventions (entry point `data.mcp_fhir.authz.decision`, data under
`mcp_fhir/config/<section>/data.yaml`, claim names in `config.claims`) but is small enough that a
full diff takes a second, and stays put while `policies/` is rewritten. It has one claim-gated rule:
a purpose with `requires_claim: K` is granted to anyone whose credential carries the claim named by
`config.claims[K]` set to `true`, for that purpose's resource types.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

REGO = """package mcp_fhir.authz

import data.mcp_fhir.config

_claims := input.subject.claims

_rtype := input.action.resource_type

_purpose := input.context.purpose

_roles contains role if {
\tsome value in _claims[config.claims.roles]
\trole := config.claims.role_map[value]
}

_covers(purpose) if object.get(config.purposes[purpose].resource_types, _rtype, null) != null

_granted if {
\tsome role in _roles
\t_rtype in config.roles[role].read
\t_purpose in config.roles[role].purposes
\t_covers(_purpose)
}

_granted if {
\tneeded := config.purposes[_purpose].requires_claim
\t_claims[config.claims[needed]] == true
\t_covers(_purpose)
}

_scoped if {
\tletter := config.defaults.scope_letter[input.action.operation]
\tsome scope in input.subject.scopes
\tscope in {"user/*.cruds", sprintf("user/%s.%s", [_rtype, letter])}
}

_patient_ok if not config.claims.patient in object.keys(_claims)

_patient_ok if _claims[config.claims.patient] == input.resource.patient

reasons contains "NOT_GRANTED" if not _granted

reasons contains "SCOPE_NOT_GRANTED" if not _scoped

reasons contains "PATIENT_MISMATCH" if not _patient_ok

decision := {
\t"allow": count(reasons) == 0,
\t"reasons": [{"code": code} | some code in sort(reasons)],
\t"obligations": {"exclude_security_labels": [], "allowed_categories": {}, "redact": [], "max_results": 10},
\t"audit": {"sensitivity": "standard", "alerts": []},
}
"""

CONFIG: dict[str, Any] = {
    "claims": {
        "roles": "roles",
        "patient": "patient",
        "research_consent": "research_consent",
        "role_map": {"nurse": "nurse", "clinician": "clinician"},
    },
    "roles": {
        "nurse": {"read": ["Patient"], "purposes": ["treatment"]},
        "clinician": {"read": ["Patient", "Observation"], "purposes": ["treatment"]},
    },
    "purposes": {
        "treatment": {"resource_types": {"Patient": {}, "Observation": {}}},
        "research": {"requires_claim": "research_consent", "resource_types": {"Patient": {}}},
    },
    "tools": {
        "read_patient": {"operation": "read", "resource_types": ["Patient"]},
        "search_observations": {"operation": "search", "resource_types": ["Observation"]},
    },
    "defaults": {"scope_letter": {"read": "r", "search": "s"}, "non_patient_resource_types": []},
}

APPROVAL = {
    "id": "APR-9",
    "role": "*",
    "tool": "search_observations",
    "purpose": "research",
    "kind": "deny_to_allow",
    "reviewer": "privacy.officer@example.org",
    "ticket": "SEC-9",
}


def write_policies(
    policies: Path, config: dict[str, Any] | None = None, approvals: list[dict] | None = None
) -> Path:
    """Write the mini policy (with `config` sections replacing the defaults) into `policies`."""
    authz = policies / "mcp_fhir" / "authz"
    authz.mkdir(parents=True, exist_ok=True)
    (authz / "authz.rego").write_text(REGO, encoding="utf-8")
    for section, value in (config or CONFIG).items():
        folder = policies / "mcp_fhir" / "config" / section
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data.yaml").write_text(yaml.safe_dump(value, sort_keys=True), encoding="utf-8")
    (policies / "approvals.yaml").write_text(yaml.safe_dump({"approvals": approvals or []}), encoding="utf-8")
    return policies


def research_reads_observations(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The claim-gated widening: with research consent, the research purpose also covers Observation."""
    cfg = yaml.safe_load(yaml.safe_dump(config or CONFIG))
    cfg["purposes"]["research"]["resource_types"]["Observation"] = {}
    return cfg


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return proc.stdout


def new_repo(root: Path, approvals: list[dict] | None = None) -> Path:
    """A git repository whose `main` holds the mini policy."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "tests@example.org")
    git(root, "config", "user.name", "tests")
    git(root, "config", "commit.gpgsign", "false")
    write_policies(root / "policies", approvals=approvals)
    commit(root, "base policy")
    return root


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
