"""Issue #11 (1): `_include`/`_revinclude` and chained references cannot be passed as arguments (see
the matrix); here we prove the other half: even when the EHR itself returns another patient's
resources, the sidecar's own patient check and enforcement drop them before anything leaves.

A `FaultProxy` sits between the sidecar and the real FHIR test bed and answers with a fixed Bundle
(`Fault.json`) that mixes the requested patient's resources with a foreign patient's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.adversarial.conftest import Sidecar, identity, sidecar
from tests.testbed import data
from tests.testbed.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

PID, OTHER = data.AU_PATIENT_ID, data.AU_DVA_PATIENT_ID
CLINICIAN = identity("adv-clinician", {"roles": ["clinician"]}, ("user/*.rs",))
ARGS = {"patient_id": PID, "purpose": "treatment"}


def observation(rid: str, subject: str | None, **extra: Any) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"text": "Heart rate"},
        "effectiveDateTime": "2026-11-01T09:00:00Z",
        **extra,
    }
    if subject is not None:
        obs["subject"] = {"reference": subject}
    return obs


def bundle(*resources: dict[str, Any], mode: str = "match") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"resource": r, "search": {"mode": mode}} for r in resources],
    }


@asynccontextmanager
async def proxied(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> AsyncIterator[tuple[Sidecar, FaultProxy]]:
    async with FaultProxy(fhir_server.base_url.split("/fhir")[0]) as proxy:
        base = proxy.url + urlsplit(fhir_server.base_url).path
        async with sidecar(tmp_path, base, opa_url, CLINICIAN, cache={"enabled": False}) as sc:
            yield sc, proxy


FOREIGN_BUNDLES: dict[str, tuple[dict[str, Any], set[str]]] = {
    "a foreign Observation beside an own one": (
        bundle(observation("own-1", f"Patient/{PID}"), observation("foreign-1", f"Patient/{OTHER}")),
        {"own-1"},
    ),
    "an _include of the foreign Patient": (
        {
            **bundle(observation("own-2", f"Patient/{PID}")),
            "entry": [
                {"resource": observation("own-2", f"Patient/{PID}"), "search": {"mode": "match"}},
                {"resource": {"resourceType": "Patient", "id": OTHER}, "search": {"mode": "include"}},
            ],
        },
        {"own-2"},
    ),
    "a _revinclude-style foreign Observation in include mode": (
        bundle(observation("foreign-2", f"Patient/{OTHER}"), mode="include"),
        set(),
    ),
    "a resource with no subject": (bundle(observation("orphan", None)), set()),
    "a Group subject": (bundle(observation("group-1", "Group/ward-7")), set()),
    "a reference that only starts with the patient id": (
        bundle(observation("prefix-1", f"Patient/{PID}0")),
        set(),
    ),
    "a reference with a history suffix": (
        bundle(observation("hist-1", f"Patient/{OTHER}/_history/1")),
        set(),
    ),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_BUNDLES))
async def test_a_foreign_patients_resource_returned_by_the_ehr_never_leaves(
    name: str, tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    body, expected_ids = FOREIGN_BUNDLES[name]
    async with proxied(tmp_path, fhir_server, opa_url) as (sc, proxy):
        proxy.set_fault(Fault.json(body))
        result = await sc.client.call_tool("search_observations", ARGS)
        [record] = sc.audit()
    assert not result.is_error, result.content[0].text
    got = result.structured_content
    assert {r["id"] for r in got["resources"]} == expected_ids
    assert OTHER not in result.content[0].text
    assert record["result"] == "allowed" and record["returned_count"] == len(expected_ids)


async def test_a_read_that_returns_another_patient_returns_nothing(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    async with proxied(tmp_path, fhir_server, opa_url) as (sc, proxy):
        proxy.set_fault(Fault.json({"resourceType": "Patient", "id": OTHER, "birthDate": "1950-01-01"}))
        result = await sc.client.call_tool("read_patient", ARGS)
        [record] = sc.audit()
    assert result.structured_content["resources"] == []
    assert result.structured_content["withheld"]["over_limit"] == 1
    assert record["returned_count"] == 0


async def test_a_resource_naming_two_patients_is_dropped(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    two = observation("two-1", f"Patient/{PID}", patient={"reference": f"Patient/{OTHER}"})
    async with proxied(tmp_path, fhir_server, opa_url) as (sc, proxy):
        proxy.set_fault(Fault.json(bundle(two)))
        result = await sc.client.call_tool("search_observations", ARGS)
    assert result.structured_content["resources"] == []
