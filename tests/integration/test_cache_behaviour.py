"""Issue #7: the cache, seen through the full sidecar with a `FaultProxy` counting what reaches the EHR.

* Repeated reads within the TTL make zero upstream requests.
* A write (`create_clinical_note`) invalidates that patient's cached documents.
* When the EHR is down after the TTL: with `allow_stale: true` the cached copy comes back with an
  explicit staleness warning and its age; without it the call fails with `upstream_unavailable`
  (never an empty result that looks like "no data").
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mcp import types

from tests.adversarial.conftest import attempt, audit_records, tool_error
from tests.integration import test_faults as faults
from tests.integration.test_faults import RECOVERY_DEADLINE, fhir_proxy, running
from tests.testbed import data
from tests.testbed.fault_proxy import Fault

pytestmark = pytest.mark.integration

opa = faults.opa  # the module-scoped managed OPA fixture

PATIENT_TTL = 1.0  # the cache's minimum TTL; Patient reads go stale after it
CACHE = {"ttl_seconds": {"Patient": PATIENT_TTL}}
NO_BREAKER = {"failure_threshold": 1000}
ARGS = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
WRITE_PATIENT = "pat-us-mixed"  # notes written here do not disturb the AU fixtures other suites assert on


async def test_repeated_reads_within_the_ttl_make_no_upstream_request(
    tmp_path: Path, fhir_server: Any, opa: Any
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        async with running(tmp_path, base, opa.url) as sc:
            first = [await sc.client.call_tool(t, ARGS) for t in ("read_patient", "search_observations")]
            seen = fhir.requests_seen
            again = [await sc.client.call_tool(t, ARGS) for t in ("read_patient", "search_observations")] * 3
            assert fhir.requests_seen == seen
    assert [r.structured_content["provenance"]["cache"] for r in first] == ["miss", "miss"]
    assert {r.structured_content["provenance"]["cache"] for r in again} == {"hit"}
    assert [r.structured_content["resources"] for r in again[:2]] == [
        r.structured_content["resources"] for r in first
    ]
    assert {r["cache"] for r in audit_records(tmp_path)} == {"miss", "hit"}


async def test_a_written_note_invalidates_that_patients_cached_documents(
    tmp_path: Path, fhir_server: Any, opa: Any
) -> None:
    args = {"patient_id": WRITE_PATIENT, "purpose": "treatment"}
    key = f"cache-{uuid.uuid4().hex[:16]}"
    async with fhir_proxy(fhir_server) as (fhir, base):
        # the policy asks a person to confirm a note (MCP elicitation): this client's person accepts
        accept = {"elicitation_callback": _accept, "mode": "legacy"}
        async with running(tmp_path, base, opa.url, client_kw=accept) as sc:
            before = await sc.client.call_tool("list_documents", {**args, "page_size": 100})
            cached = await sc.client.call_tool("list_documents", {**args, "page_size": 100})
            written = await sc.client.call_tool(
                "create_clinical_note",
                {**args, "title": "Cache test", "text": "Reviewed.", "idempotency_key": key},
            )
            seen = fhir.requests_seen
            after = await sc.client.call_tool("list_documents", {**args, "page_size": 100})
            assert fhir.requests_seen > seen
    assert cached.structured_content["provenance"]["cache"] == "hit"
    assert not written.is_error, written.content[0].text
    note_id = written.structured_content["document_id"]
    assert note_id not in {r["id"] for r in before.structured_content["resources"]}
    assert after.structured_content["provenance"]["cache"] == "miss"
    assert note_id in {r["id"] for r in after.structured_content["resources"]}


async def _accept(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"confirm": True})


async def _read_once_expired(sc: Any) -> Any:
    """Read until the cached Patient is past its TTL (a real condition), with the EHR failing."""
    end = time.monotonic() + RECOVERY_DEADLINE
    while True:
        result = await attempt(sc.client, "read_patient", ARGS)
        if isinstance(result, Exception) or result.structured_content["provenance"]["cache"] != "hit":
            return result
        if time.monotonic() > end:
            pytest.fail("the cached entry never expired")


async def test_stale_fallback_returns_the_cached_copy_with_a_warning_and_its_age_only_when_allowed(
    tmp_path: Path, fhir_server: Any, opa: Any
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        backend = {"base_url": base, "allow_stale": True, "breaker": NO_BREAKER}
        async with running(tmp_path, base, opa.url, cache=CACHE, backends={"testbed": backend}) as sc:
            fresh = await sc.client.call_tool("read_patient", ARGS)
            fhir.set_fault(Fault.status(503))
            stale = await _read_once_expired(sc)
            fhir.clear()
    assert not stale.is_error, stale.content[0].text
    prov = stale.structured_content["provenance"]
    assert prov["cache"] == "stale" and prov["stale"] is True
    assert prov["warning"] and prov["cache_age_seconds"] >= PATIENT_TTL
    assert "STALE" in stale.content[0].text
    assert stale.structured_content["resources"] == fresh.structured_content["resources"]
    assert audit_records(tmp_path)[-1]["cache"] == "stale"


async def test_without_allow_stale_an_outage_is_upstream_unavailable_never_an_empty_result(
    tmp_path: Path, fhir_server: Any, opa: Any
) -> None:
    async with fhir_proxy(fhir_server) as (fhir, base):
        backend = {"base_url": base, "allow_stale": False, "breaker": NO_BREAKER}
        async with running(tmp_path, base, opa.url, cache=CACHE, backends={"testbed": backend}) as sc:
            await sc.client.call_tool("read_patient", ARGS)
            fhir.set_fault(Fault.status(503))
            result = await _read_once_expired(sc)
            fhir.clear()
    assert isinstance(result, Exception), "an outage must not look like a result"
    assert tool_error(result)["code"] == "upstream_unavailable"
    assert audit_records(tmp_path)[-1]["result"] == "error"
