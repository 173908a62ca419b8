"""Access-pattern anomalies decided in Rego, end to end (issue #21 §3): the official MCP client, the real
OPA with the shipped policy (`config/activity`: `bulk_access` above 20 distinct patients in 600 s), the
FHIR test bed, and the activity counters in memory or in Redis shared by two replicas.

The test bed holds nine patients; this module PUTs sixteen more (`wire-bulk-01` ... `wire-bulk-16`,
demographics only) and seeds the ID map with all twenty-five.
"""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client

from mcp_fhir import config, metrics
from mcp_fhir.server import build_server
from tests.adversarial.conftest import audit_records
from tests.adversarial.conftest import opa_url as opa_url  # the session's real OPA (a fixture)
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, sidecar_config

pytestmark = pytest.mark.integration

EXTRA = tuple(f"wire-bulk-{i:02d}" for i in range(1, 17))
PATIENTS = (*sorted(data.PATIENTS), *EXTRA)  # 25
PATIENT_KEY_ENV = "MCP_FHIR_TEST_ACTIVITY_KEY"
REDIS_ENV = "MCP_FHIR_TEST_REDIS_URL"


@pytest.fixture(scope="module")
def many_patients(fhir_server: Any) -> tuple[str, ...]:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "id": pid,
                    "name": [{"family": "Bulk", "given": [f"Test{pid[-2:]}"]}],
                    "gender": "unknown",
                },
                "request": {"method": "PUT", "url": f"Patient/{pid}"},
            }
            for pid in EXTRA
        ],
    }
    fhir_server.load([("bulk patients", json.dumps(bundle))])
    return PATIENTS


def _seed(path: Path) -> str:
    path.write_text(
        yaml.safe_dump([{"canonical": p, "ids": {"testbed": {"fhir_id": p}}} for p in PATIENTS]),
        encoding="utf-8",
    )
    return str(path)


def _settings(workdir: Path, fhir_server: Any, opa: str, activity: dict[str, Any]) -> config.Settings:
    workdir.mkdir(parents=True, exist_ok=True)
    return config.from_mapping(
        sidecar_config(
            workdir,
            fhir_server.base_url,
            opa_url=opa,
            identity=CLINICIAN,
            idmap={"seed_file": _seed(workdir / "seed.yaml")},
            activity={"enabled": True, **activity},
        )
    )


def _alerts(name: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_alerts_total", {"alert": name}) or 0.0


async def _read_each(client: Client, patients: tuple[str, ...]) -> None:
    for pid in patients:
        result = await client.call_tool("read_patient", {"patient_id": pid, "purpose": "treatment"})
        assert not result.is_error, result.content[0].text


async def test_one_agent_across_25_patients_raises_bulk_access_from_the_21st(
    tmp_path, fhir_server, opa_url, many_patients
):
    before = _alerts("bulk_access")
    async with Client(build_server(_settings(tmp_path, fhir_server, opa_url, {}))) as client:
        await _read_each(client, many_patients)
    access = audit_records(tmp_path)
    flagged = ["bulk_access" in r["alerts"] for r in access]
    assert flagged == [False] * 20 + [True] * 5  # every call allowed; alerted from the 21st patient on
    assert all(r["result"] == "allowed" for r in access)
    assert access[-1]["decision_input"]["context"]["activity"]["600"]["distinct_patients"] == 25
    assert audit_records(tmp_path, "alert") == []  # one record per call: the alert is inside it (#19 §5)
    assert _alerts("bulk_access") - before == 5


async def test_two_replicas_sharing_redis_counters_see_one_agents_patients_together(
    tmp_path, fhir_server, opa_url, many_patients, redis_url, monkeypatch
):
    monkeypatch.setenv(REDIS_ENV, redis_url)
    monkeypatch.setenv(PATIENT_KEY_ENV, "one key for every replica")
    shared = {
        "store": "redis",
        "redis_url_env": REDIS_ENV,
        "patient_key_env": PATIENT_KEY_ENV,
        "key_prefix": f"test-wire:{uuid.uuid4().hex}",
    }
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            Client(build_server(_settings(tmp_path / "a", fhir_server, opa_url, shared)))
        )
        b = await stack.enter_async_context(
            Client(build_server(_settings(tmp_path / "b", fhir_server, opa_url, shared)))
        )
        await _read_each(a, many_patients[:12])
        await _read_each(b, many_patients[6:18])  # six seen by replica a, six new
        await _read_each(a, many_patients[18:])  # seven more: 25 distinct in all
    last_a = audit_records(tmp_path / "a")[-1]["decision_input"]["context"]["activity"]["600"]
    last_b = audit_records(tmp_path / "b")[-1]["decision_input"]["context"]["activity"]["600"]
    assert last_b == {"calls": 24, "distinct_patients": 18, "denials": 0}
    assert last_a == {"calls": 31, "distinct_patients": 25, "denials": 0}
    assert ["bulk_access" in r["alerts"] for r in audit_records(tmp_path / "a")][-5:] == [True] * 5
