"""Which source each search result came from (#18 §1), end to end: the official MCP client, the real OPA,
the real FHIR test bed, and a backend with `hl7v2_results_dir` holding a public Queensland ORU^R01.

The structured result's `sources` maps every returned resource (`resourceType/id`) to `fhir` or `hl7v2`,
and the markdown names the results that were converted from HL7 v2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.data import VENDOR_SAMPLES
from tests.testbed.sidecar import CLINICIAN, sidecar_config

pytestmark = pytest.mark.integration

# Source: PeterPiper TestSetOfMsg.dat (angusmillar/PeterPiper), a Queensland SuperLIS pathology ORU^R01.
QLD_ORU = "oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"
HL7_TAG_CODE = "hl7v2-oru-r01"
PATIENT = "pat-us-healthy"  # 34 Observations in the test bed: one page of 100 holds them and the HL7 ones


def _from_hl7(resource: dict[str, Any]) -> bool:
    return any(t.get("code") == HL7_TAG_CODE for t in (resource.get("meta") or {}).get("tag") or [])


async def test_every_search_result_names_its_source_and_the_markdown_names_the_hl7_ones(
    tmp_path: Path, fhir_server: Any
) -> None:
    drop = tmp_path / "hl7"
    drop.mkdir()
    message = (VENDOR_SAMPLES / QLD_ORU).read_text()
    (drop / "result.hl7").write_text(message.replace("123456^^^PCH", f"{PATIENT}^^^PCH"))
    cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN)
    cfg["backends"]["testbed"].update(
        {"profile": "best_practice", "hl7v2_results_dir": str(drop), "timezone": "Australia/Brisbane"}
    )
    async with Client(build_server(config.from_mapping(cfg))) as client:
        result = await client.call_tool(
            "search_observations", {"patient_id": PATIENT, "purpose": "treatment", "page_size": 100}
        )
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    expected = {
        f"{r['resourceType']}/{r['id']}": "hl7v2" if _from_hl7(r) else "fhir" for r in out["resources"]
    }
    assert out["sources"] == expected
    assert set(expected.values()) == {"fhir", "hl7v2"}  # the search mixed both sources
    markdown = result.content[0].text
    hl7_refs = [ref for ref, src in expected.items() if src == "hl7v2"]
    assert f"converted from HL7 v2 lab messages: {len(hl7_refs)}" in markdown
    assert all(ref in markdown.split("converted from HL7 v2")[1] for ref in hl7_refs)


async def test_a_search_with_no_hl7_results_says_every_result_came_from_the_fhir_api(
    tmp_path: Path, fhir_server: Any
) -> None:
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN))
    async with Client(build_server(settings)) as client:
        result = await client.call_tool(
            "search_observations", {"patient_id": PATIENT, "purpose": "treatment", "page_size": 100}
        )
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    assert out["resources"]
    assert set(out["sources"].values()) == {"fhir"}
    assert len(out["sources"]) == len(out["resources"])
    assert f"_from the EHR's FHIR API: all {out['count']}_" in result.content[0].text
