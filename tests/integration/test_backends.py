"""Backend assembly against the real test bed: FHIR version detection, and the HL7 v2 results fallback."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.backends import open_backends
from mcp_fhir.server import build_server
from tests.data import VENDOR_SAMPLES
from tests.testbed import data
from tests.testbed.fhir import start_fhir_server
from tests.testbed.sidecar import CLINICIAN, sidecar_config

pytestmark = pytest.mark.integration

# Source: PeterPiper TestSetOfMsg.dat (angusmillar/PeterPiper), a Queensland SuperLIS pathology ORU^R01.
QLD_ORU = Path("oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7")
SHARED = VENDOR_SAMPLES


def qld_message() -> str:
    path = SHARED / QLD_ORU.name
    return path.read_text()


async def test_a_generic_backend_that_speaks_stu3_is_detected_and_normalised(tmp_path):
    with start_fhir_server(fhir_version="3.0.2", load=False) as stu3:
        settings = config.from_mapping(sidecar_config(tmp_path, stu3.base_url))
        async with AsyncExitStack() as stack:
            clients, _ = await open_backends(stack, settings)
            assert clients["testbed"].fhir_version == "3.0.2"
            assert clients["testbed"]._normalise is not None


async def test_an_r4_backend_keeps_plain_r4(tmp_path, fhir_server):
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url))
    async with AsyncExitStack() as stack:
        clients, _ = await open_backends(stack, settings)
        assert clients["testbed"].fhir_version == "4.0.1"
        assert clients["testbed"]._normalise is None


async def test_hl7_v2_results_complete_an_au_gp_observation_search_under_the_same_policy(
    tmp_path, fhir_server
):
    drop = tmp_path / "hl7"
    drop.mkdir()
    # The message's MRN (PID-3) is rewritten to the test-bed patient's id on this backend.
    (drop / "result.hl7").write_text(qld_message().replace("123456^^^PCH", f"{data.AU_PATIENT_ID}^^^PCH"))
    cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN)
    cfg["backends"]["testbed"].update(
        {"profile": "best_practice", "hl7v2_results_dir": str(drop), "timezone": "Australia/Brisbane"}
    )
    async with Client(build_server(config.from_mapping(cfg))) as client:
        result = await client.call_tool(
            "search_observations",
            {
                "patient_id": data.AU_PATIENT_ID,
                "purpose": "treatment",
                "category": "laboratory",
                "page_size": 100,
            },
        )
    assert not result.is_error, result.content[0].text
    from_hl7 = [
        r
        for r in result.structured_content["resources"]
        if (r.get("meta") or {}).get("source", "").startswith("urn:mcp-fhir:hl7v2")
    ]
    codes = {c["code"] for r in from_hl7 for c in r["code"]["coding"]}
    assert "33914-3" in codes  # eGFR, as LOINC
    assert all(r["subject"]["reference"] == f"Patient/{data.AU_PATIENT_ID}" for r in from_hl7)


async def test_hl7_v2_results_of_another_patient_are_never_served(tmp_path, fhir_server):
    drop = tmp_path / "hl7"
    drop.mkdir()
    (drop / "result.hl7").write_text(qld_message())  # PID-3 is someone else
    cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN)
    cfg["backends"]["testbed"].update({"profile": "best_practice", "hl7v2_results_dir": str(drop)})
    async with Client(build_server(config.from_mapping(cfg))) as client:
        result = await client.call_tool(
            "search_observations",
            {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment", "page_size": 100},
        )
    assert not any(
        (r.get("meta") or {}).get("source", "").startswith("urn:mcp-fhir:hl7v2")
        for r in result.structured_content["resources"]
    )


# Source: PeterPiper TestMessage.cs (angusmillar/PeterPiper), a Queensland AUSLAB urine M/C/S of 2014-05-27.
AU_MICRO = "oru_r01_au_microbiology_qld_auslab_urine_mcs.hl7"


async def test_hl7_v2_results_obey_the_dates_code_page_size_and_continuation_of_the_search(
    tmp_path, fhir_server
):
    drop = tmp_path / "hl7"
    drop.mkdir()
    pid = f"{data.AU_PATIENT_ID}^^^PCH".encode()
    (drop / "chemistry.hl7").write_bytes((SHARED / QLD_ORU.name).read_bytes().replace(b"123456^^^PCH", pid))
    (drop / "micro.hl7").write_bytes(
        (SHARED / AU_MICRO)
        .read_bytes()
        .replace(b"PA3000\\R\\0004^^^^MR", b"%s^^^^MR" % data.AU_PATIENT_ID.encode())
    )
    cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN)
    cfg["backends"]["testbed"].update(
        {"profile": "best_practice", "hl7v2_results_dir": str(drop), "timezone": "Australia/Brisbane"}
    )
    may = {
        "patient_id": data.AU_PATIENT_ID,
        "purpose": "treatment",
        "date_from": "2014-05-01",
        "date_to": "2014-05-31",
    }
    async with Client(build_server(config.from_mapping(cfg))) as client:
        pages, continuation = [], None
        while True:
            args = {**may, "page_size": 5, **({"continuation": continuation} if continuation else {})}
            result = await client.call_tool("search_observations", args)
            assert not result.is_error, result.content[0].text
            pages.append(result.structured_content["resources"])
            continuation = result.structured_content.get("continuation")
            if not continuation or len(pages) > 10:
                break
        organism = await client.call_tool("search_observations", {**may, "code": "ORG", "page_size": 5})
        march = await client.call_tool(
            "search_observations",
            {**may, "date_from": "2014-03-01", "date_to": "2014-03-31", "page_size": 100},
        )
    assert [len(p) for p in pages] == [5, 5, 5, 3]  # the 18 results of 27 May, never the March chemistry
    ids = [r["id"] for p in pages for r in p]
    assert len(set(ids)) == 18
    assert all(r["effectiveDateTime"].startswith("2014-05-27") for p in pages for r in p)
    assert all(
        any(t["code"] == "hl7v2-oru-r01" for t in r["meta"]["tag"]) for p in pages for r in p
    )  # each says it came from HL7 v2
    (org,) = organism.structured_content["resources"]
    assert org["valueCodeableConcept"]["text"] == "E. coli (ESBL Producer)"
    assert org["hasMember"]  # its quantity, linked
    assert {r["effectiveDateTime"][:7] for r in march.structured_content["resources"]} == {"2014-03"}
