"""Oversized, malformed and hostile tool arguments never reach OPA or the EHR.

The sidecar runs over streamable HTTP with a fault proxy (pass-through) in front of OPA and
another in front of the FHIR test bed, so "never reach" is counted, not assumed: after every
hostile call both proxies have seen zero requests. Each call gets a tool error whose JSON names
the argument (`code: invalid_argument`), and each rejection is in the audit trail. A valid call
at the end shows the proxies do count.

The second half asserts the two error shapes: a denial is a tool error with reason codes and a
decision id; an infrastructure failure (FHIR server down) is an MCP error with `data.code`.
Neither carries a stack trace, PHI or a credential.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from mcp_fhir.policy.managed_opa import ManagedOpa
from tests.integration.test_surface_http import (
    READ_ARGS,
    HttpSidecar,
    audit_records,
    mcp_client,
    start_http_sidecar,
)
from tests.testbed import data
from tests.testbed.fault_proxy import Fault, FaultProxy
from tests.testbed.sidecar import POLICIES

pytestmark = pytest.mark.integration

ONE_MB: Final = 1_000_000
READY_TIMEOUT: Final = 20.0
PAT: Final = data.AU_PATIENT_ID
NOTE: Final = {"title": "Progress", "idempotency_key": "key-hostile-01", "purpose": "treatment"}

# (tool, arguments, the argument the error must name)
HOSTILE: Final[list[tuple[str, dict[str, Any], str]]] = [
    ("read_patient", {"patient_id": "../Patient/x", "purpose": "treatment"}, "patient_id"),
    ("read_patient", {"patient_id": f"{PAT}/../../x", "purpose": "treatment"}, "patient_id"),
    ("read_patient", {"patient_id": f"{PAT}?_include=*", "purpose": "treatment"}, "patient_id"),
    ("read_document", {"patient_id": PAT, "document_id": "../../Patient/pat-us-diabetes"}, "document_id"),
    ("search_observations", {"patient_id": PAT, "code": "x&patient=other"}, "code"),
    ("search_observations", {"patient_id": PAT, "category": "laboratory,_include=*"}, "category"),
    (
        "search_observations",
        {"patient_id": PAT, "date_from": "1026-01-01", "date_to": "2026-01-01"},
        "date_to",
    ),
    ("search_observations", {"patient_id": PAT, "date_from": "1026-01-01"}, "date_from"),
    (
        "search_observations",
        {"patient_id": PAT, "date_from": "2026-01-01", "date_to": "2020-01-01"},
        "date_from",
    ),
    ("create_clinical_note", {"patient_id": PAT, "text": "x" * ONE_MB, **NOTE}, "text"),
    ("read_patient", {"patient_id": "p" * ONE_MB}, "patient_id"),
    ("read_patient", {"patient_id": 5}, "patient_id"),
    ("read_patient", {"patient_id": [PAT]}, "patient_id"),
    ("search_observations", {"patient_id": PAT, "page_size": "all"}, "page_size"),
    ("search_observations", {"patient_id": PAT, "page_size": 10_000}, "page_size"),
    ("search_observations", {"patient_id": PAT, "date_from": "yesterday"}, "date_from"),
    ("read_patient", {"patient_id": PAT, "purpose": {"$ne": None}}, "purpose"),
    ("read_patient", {"patient_id": PAT, "purpose": "Treatment; DROP"}, "purpose"),
    ("read_patient", {"purpose": "treatment"}, "patient_id"),
    ("read_patient", {**READ_ARGS, "_include": "*"}, "_include"),
    ("search_observations", {**READ_ARGS, "subject": "Patient/other"}, "subject"),
    ("read_patient", {**READ_ARGS, "x" * 500: 1}, "arguments"),
]


@dataclass
class Guarded:
    sidecar: HttpSidecar
    opa: FaultProxy
    fhir: FaultProxy


def _wait_ready(sidecar: HttpSidecar) -> None:
    """Poll /readyz until the lifespan has opened OPA and the EHR client (a real condition, bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx2.Client(timeout=READY_TIMEOUT) as client:
        while client.get(f"{sidecar.base_url}/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the sidecar did not become ready")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, fhir_server: Any) -> Iterator[Guarded]:
    workdir = tmp_path_factory.mktemp("hostile")
    opa = ManagedOpa([POLICIES], decision_log=workdir / "opa-decisions.log")  # decision ids need the log on
    asyncio.run(opa.start())
    try:
        with FaultProxy(opa.url) as opa_proxy, FaultProxy(fhir_server.base_url) as fhir_proxy:
            thread, sidecar = start_http_sidecar(
                workdir,
                fhir_proxy.url,
                opa_url=opa_proxy.url,
                cache={"enabled": False},
            )
            with thread:
                _wait_ready(sidecar)  # start-up traffic (capability statement, health) is not a tool call's
                yield Guarded(sidecar=sidecar, opa=opa_proxy, fhir=fhir_proxy)
    finally:
        asyncio.run(opa.stop())


@pytest.mark.parametrize(
    ("tool", "arguments", "argument"), HOSTILE, ids=lambda v: v if isinstance(v, str) else None
)
async def test_a_hostile_argument_is_refused_by_name_before_opa_or_the_ehr(
    guarded, tool, arguments, argument
):
    opa_before, fhir_before = guarded.opa.requests_seen, guarded.fhir.requests_seen
    audited_before = len(audit_records(guarded.sidecar.audit_path, "access"))
    async with mcp_client(guarded.sidecar.url, guarded.sidecar.headers("clinician")) as client:
        result = await client.call_tool(tool, arguments)
    assert result.is_error
    err = json.loads(result.content[0].text)
    assert (err["code"], err["argument"]) == ("invalid_argument", argument)
    assert len(result.content[0].text) < 1_000  # the value is never echoed back
    assert (guarded.opa.requests_seen, guarded.fhir.requests_seen) == (opa_before, fhir_before)
    new = audit_records(guarded.sidecar.audit_path, "access")[audited_before:]
    assert [(r["tool"], r["result"], r["error_code"]) for r in new] == [(tool, "error", "invalid_argument")]
    assert new[0]["decision_id"] is None


async def test_the_proxies_do_count_a_valid_call(guarded):
    opa_before, fhir_before = guarded.opa.requests_seen, guarded.fhir.requests_seen
    async with mcp_client(guarded.sidecar.url, guarded.sidecar.headers("clinician")) as client:
        result = await client.call_tool("read_patient", READ_ARGS)
    assert not result.is_error, result.content[0].text
    assert guarded.opa.requests_seen > opa_before
    assert guarded.fhir.requests_seen > fhir_before


async def test_hostile_tool_schemas_refuse_unknown_arguments_up_front(guarded):
    async with mcp_client(guarded.sidecar.url, guarded.sidecar.headers("clinician")) as client:
        tools = (await client.list_tools()).tools
    assert tools and all(t.input_schema.get("additionalProperties") is False for t in tools)


# --- the two error shapes -------------------------------------------------------------------


def _no_leaks(text: str, sidecar: HttpSidecar) -> None:
    assert "Traceback" not in text and 'File "' not in text
    for phi in data.KNOWN_PHI:
        assert phi not in text
    for key in sidecar.keys.values():
        assert key not in text


async def test_a_denial_is_a_tool_error_with_reasons_and_decision_id_and_no_leaks(guarded):
    async with mcp_client(guarded.sidecar.url, guarded.sidecar.headers("nurse")) as client:
        result = await client.call_tool("read_document", {**READ_ARGS, "document_id": data.PSY_NOTE_ID})
    assert result.is_error
    text = result.content[0].text
    err = json.loads(text)
    assert err["code"] == "policy_denied" and err["reasons"] and err["decision_id"]
    _no_leaks(text, guarded.sidecar)


async def test_the_fhir_server_down_is_an_mcp_error_with_upstream_unavailable_and_no_leaks(guarded):
    guarded.fhir.set_fault(Fault.down())
    try:
        async with mcp_client(
            guarded.sidecar.url, guarded.sidecar.headers("clinician"), mode="legacy"
        ) as client:
            with pytest.raises(MCPError) as caught:
                await client.call_tool("search_conditions", READ_ARGS)
    finally:
        guarded.fhir.clear()
    error = caught.value.error
    assert error.code == -32050
    assert error.data["code"] == "upstream_unavailable"
    _no_leaks(json.dumps(error.model_dump(mode="json")), guarded.sidecar)
    [record] = [
        r for r in audit_records(guarded.sidecar.audit_path, "access") if r["tool"] == "search_conditions"
    ]
    assert (record["result"], record["error_code"]) == ("error", "upstream_unavailable")
