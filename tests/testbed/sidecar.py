"""Build sidecar configurations over the real test bed, for tests, the demo and the benchmarks."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2
import yaml

from mcp_fhir import config
from mcp_fhir.config import Settings
from tests.testbed import data

REPO = Path(__file__).resolve().parents[2]
# Tests about behaviour must not fail because a loaded CI machine made OPA slower than the production
# default (0.5 s). The fault suite tests the timeout itself, with its own value.
TEST_DECISION_TIMEOUT = 3.0
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
            "decision_timeout": TEST_DECISION_TIMEOUT,
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


READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class SidecarProcess:
    """`mcp-fhir serve --config FILE` as a child process on loopback, ready when `/readyz` answers 200."""

    def __init__(self, config_path: Path, *, url: str, log_level: str = "WARNING") -> None:
        self.config_path = config_path
        self.url = url
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProcess:
        cmd = [
            str(REPO / ".venv/bin/mcp-fhir"),
            "serve",
            "--config",
            str(self.config_path),
            "--log-level",
            self.log_level,
        ]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx2.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mcp-fhir serve exited with status {self.process.returncode}")
                try:
                    if http.get(self.url + "/readyz").status_code == 200:
                        return self
                except httpx2.TransportError:
                    pass
                time.sleep(0.05)  # polling a real condition (readiness), bounded by the deadline
        self.stop()
        raise RuntimeError("mcp-fhir serve did not become ready in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_config(
    workdir: Path, fhir_base_url: str, port: int, keys: list[dict[str, Any]], **overrides: Any
) -> Path:
    """Write an HTTP config with API keys (`{"id", "hash", "claims", "scopes"}` each) and return its path."""
    cfg = sidecar_config(workdir, fhir_base_url, transport="http", **overrides)
    cfg["server"] = {**cfg["server"], "transport": "http", "host": "127.0.0.1", "port": port}
    cfg["auth"] = {"api_keys": keys}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def api_key_entry(identity: dict[str, Any], digest: str) -> dict[str, Any]:
    return {"id": identity["id"], "hash": digest, "claims": identity["claims"], "scopes": identity["scopes"]}


NURSE_READ = "  read: [Observation, Patient]"
NURSE_READ_WIDER = "  read: [MedicationStatement, Observation, Patient]"


def policies_with_nurse_reading_medications(workdir: Path, name: str = "policies") -> Path:
    """A copy of `policies/` where the nurse role also reads MedicationStatement: a real widening."""
    import shutil

    copy = workdir / name
    shutil.copytree(POLICIES, copy)
    roles = copy / "mcp_fhir" / "config" / "roles" / "data.yaml"
    text = roles.read_text(encoding="utf-8")
    if NURSE_READ not in text:
        raise AssertionError("the nurse role's read list changed shape; update this helper's edit")
    roles.write_text(text.replace(NURSE_READ, NURSE_READ_WIDER), encoding="utf-8")
    return copy
