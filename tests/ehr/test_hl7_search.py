"""HL7 v2 results obey the search: filtered by date, code and category, paged after the EHR's, with their source.

The EHR is `FakeEhrHttp` (one module under test: the EHR client); the HL7 v2 folder holds two public
Queensland messages for one patient (vendor-samples/SOURCES.md §4): the AUSLAB urine M/C/S of 2014-05-27
(18 Observations, 2 reports) and the SUPERLIS chemistry of 2014-03-02/03 (33 Observations, 5 reports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mcp_fhir._exceptions import UpstreamBadResponse
from mcp_fhir.ehr.client import FhirEHRClient
from mcp_fhir.ehr.hl7_results import Hl7ResultsSource
from mcp_fhir.ehr.paging import CURSOR_SEGMENT, Cursor
from mcp_fhir.ehr.transport import FakeEhrHttp, Response, SentRequest
from tests.data import VENDOR_SAMPLES

BASE = "http://ehr.test/fhir"
PATIENT = "22222221111"  # PID-3 (Medicare number) of the micro message; the chemistry one is rewritten to it
MICRO = VENDOR_SAMPLES / "oru_r01_au_microbiology_qld_auslab_urine_mcs.hl7"
CHEMISTRY = VENDOR_SAMPLES / "oru_r01_au_pathology_qld_superlis_egfr_trop_fbc.hl7"
HL7_TAG = "hl7v2-oru-r01"


def _bundle(*ids: str, next_url: str | None = None, total: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": i,
                    "subject": {"reference": f"Patient/{PATIENT}"},
                    "effectiveDateTime": "2024-01-01",
                }
            }
            for i in ids
        ],
    }
    if next_url:
        body["link"] = [{"relation": "next", "url": next_url}]
    if total is not None:
        body["total"] = total
    return body


class Ehr:
    """An EHR that holds `ids` and serves them `per_page` at a time, whatever `_count` says."""

    def __init__(self, ids: list[str], per_page: int) -> None:
        self.ids = ids
        self.per_page = per_page
        self.requests: list[SentRequest] = []

    def handler(self, request: SentRequest) -> Response:
        self.requests.append(request)
        offset = int(parse_qs(urlsplit(str(request.url)).query).get("offset", ["0"])[0])
        page = self.ids[offset : offset + self.per_page]
        more = offset + self.per_page < len(self.ids)
        nxt = f"{BASE}/Observation?offset={offset + self.per_page}" if more else None
        return Response(200, _bundle(*page, next_url=nxt, total=len(self.ids)))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "micro.hl7").write_bytes(MICRO.read_bytes())
    (tmp_path / "chem.hl7").write_bytes(
        CHEMISTRY.read_bytes().replace(b"123456^^^PCH", f"{PATIENT}^^^PCH".encode())
    )
    return tmp_path


def _client(ehr: Ehr, folder: Path | None) -> FhirEHRClient:
    hl7 = Hl7ResultsSource(folder, timezone="Australia/Brisbane") if folder is not None else None
    return FhirEHRClient("ehr", BASE, http=FakeEhrHttp(ehr.handler), hl7_results=hl7)


async def _all_pages(
    client: FhirEHRClient, query: dict[str, Any], size: int, rtype: str = "Observation"
) -> list:
    pages = []
    nxt = None
    while True:
        page = await client.search(rtype, query, patient="pat-1", page_size=size, next_url=nxt)
        pages.append(page)
        assert len(page.resources) <= size
        nxt = page.next_url
        if nxt is None:
            return pages
        assert len(pages) < 50


def _hl7(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if any(t.get("code") == HL7_TAG for t in r.get("meta", {}).get("tag", []))]


async def test_hl7_results_outside_the_date_range_are_left_out(folder: Path):
    client = _client(Ehr([], 10), folder)
    query = {"patient": PATIENT, "date": ["ge2014-05-27", "le2014-05-27"]}
    page = await client.search("Observation", query, patient="pat-1", page_size=100)
    assert len(page.resources) == 18  # the urine M/C/S only; the March chemistry is outside
    assert {r["effectiveDateTime"][:10] for r in page.resources} == {"2014-05-27"}
    before = await client.search(
        "Observation", {"patient": PATIENT, "date": "le2014-04-01"}, patient="p", page_size=100
    )
    assert len(before.resources) == 33 and {r["effectiveDateTime"][:7] for r in before.resources} == {
        "2014-03"
    }


async def test_a_calendar_date_is_the_labs_own_day_and_an_instant_is_an_instant(folder: Path):
    client = _client(Ehr([], 10), folder)
    # 09:56 +10:00 on 27 May is 23:56 UTC on 26 May: on the 27th by the lab's calendar, before 27th 00:00Z.
    local = await client.search(
        "Observation", {"patient": PATIENT, "date": "ge2014-05-27"}, patient="p", page_size=100
    )
    instant = await client.search(
        "Observation", {"patient": PATIENT, "date": "ge2014-05-27T00:00:00Z"}, patient="p", page_size=100
    )
    assert len(local.resources) == 18
    assert instant.resources == []


async def test_hl7_results_are_filtered_by_code_and_category(folder: Path):
    client = _client(Ehr([], 10), folder)

    async def count(**filters: str) -> int:
        page = await client.search("Observation", {"patient": PATIENT, **filters}, patient="p", page_size=100)
        return len(page.resources)

    assert await count(code="http://loinc.org|33914-3") == 1  # eGFR
    assert await count(code="urn:mcp-fhir:hl7v2:cs:AUSLAB|ORG,urn:mcp-fhir:hl7v2:cs:AUSLAB|QUANT") == 2
    assert await count(code="ORG") == 1
    assert await count(code="http://loinc.org|ORG") == 0
    assert await count(category="laboratory") == 51
    assert await count(category="vital-signs") == 0
    assert await count(category="laboratory,vital-signs") == 51
    assert await count(category="http://terminology.hl7.org/CodeSystem/v2-0074|MB") == 18


async def test_a_filter_the_hl7_source_cannot_apply_leaves_its_results_out(folder: Path):
    client = _client(Ehr([], 10), folder)
    page = await client.search(
        "Observation", {"patient": PATIENT, "status": "final"}, patient="p", page_size=100
    )
    assert page.resources == []


async def test_hl7_results_follow_the_ehrs_pages_each_page_at_most_page_size_with_a_continuation(
    folder: Path,
):
    ehr = Ehr([f"e{i}" for i in range(7)], per_page=3)
    client = _client(ehr, folder)
    pages = await _all_pages(client, {"patient": PATIENT, "date": "ge2014-05-27"}, size=4)
    ids = [r["id"] for p in pages for r in p.resources]
    assert ids[:7] == [f"e{i}" for i in range(7)]  # the EHR's first, in its order
    assert len(ids) == 7 + 18 and len(set(ids)) == len(ids)  # then every HL7 result once
    # The EHR's pages as it sent them (3, 3, 1), its last one filled up with HL7 results, then pages of 4.
    assert [len(p.resources) for p in pages] == [3, 3, 4, 4, 4, 4, 3]
    assert pages[0].total == 7 + 18
    assert pages[-1].next_url is None


async def test_an_ehr_page_larger_than_page_size_is_trimmed_and_continued(folder: Path):
    ehr = Ehr([f"e{i}" for i in range(7)], per_page=7)  # ignores _count
    for client in (_client(ehr, None), _client(ehr, folder)):
        pages = await _all_pages(client, {"patient": "nobody-in-hl7"}, size=3)
        assert [[r["id"] for r in p.resources] for p in pages] == [
            ["e0", "e1", "e2"],
            ["e3", "e4", "e5"],
            ["e6"],
        ]
        assert f"/{CURSOR_SEGMENT}/" in str(pages[0].next_url)


async def test_a_plain_ehr_search_keeps_the_ehrs_own_next_link():
    ehr = Ehr([f"e{i}" for i in range(4)], per_page=2)
    page = await _client(ehr, None).search("Observation", {"patient": PATIENT}, patient="p", page_size=2)
    assert page.next_url == f"{BASE}/Observation?offset=2"


async def test_each_result_says_which_source_it_came_from(folder: Path):
    ehr = Ehr(["e0"], per_page=5)
    page = await _client(ehr, folder).search(
        "Observation", {"patient": PATIENT, "code": "e0,ORG"}, patient="p", page_size=10
    )
    by_id = {r["id"]: r for r in page.resources}
    from_ehr, from_hl7 = by_id["e0"], by_id["0000000000000000010D-1-16"]
    assert page.source_of(from_ehr) == "fhir" and page.source_of(from_hl7) == "hl7v2"
    assert {t["code"] for t in from_ehr["meta"]["tag"]} == {"fhir-api"}
    assert {t["code"] for t in from_hl7["meta"]["tag"]} == {HL7_TAG}
    assert from_hl7["meta"]["source"] == "urn:mcp-fhir:hl7v2:msh-10:0000000000000000010D"


async def test_hl7_diagnostic_reports_complete_a_report_search(folder: Path):
    client = _client(Ehr([], 10), folder)
    page = await client.search(
        "DiagnosticReport", {"patient": PATIENT, "category": "MB"}, patient="p", page_size=10
    )
    assert [r["code"]["text"] for r in page.resources] == ["Urine M/C/S", "Sensitivity Panel"]
    assert all(r["subject"] == {"reference": f"Patient/{PATIENT}"} for r in page.resources)


async def test_the_hl7_results_a_cursor_returns_are_copies(folder: Path):
    client = _client(Ehr([], 10), folder)
    first = await client.search("Observation", {"patient": PATIENT}, patient="p", page_size=100)
    first.resources[0]["code"] = {"text": "changed"}
    again = await client.search("Observation", {"patient": PATIENT}, patient="p", page_size=100)
    assert again.resources[0]["code"] != {"text": "changed"}


@pytest.mark.parametrize(
    "cursor",
    [
        f"{BASE}/{CURSOR_SEGMENT}/not-base64!",
        f"{BASE}/{CURSOR_SEGMENT}/" + "e30",  # {}: no query is fine, but see below for bad fields
        Cursor(upstream="http://evil.test/fhir/Observation").encode(BASE),
        Cursor(upstream=f"{BASE}/../admin").encode(BASE),
    ],
)
async def test_a_malformed_or_escaping_cursor_is_refused_without_a_request(cursor: str, folder: Path):
    ehr = Ehr(["e0"], per_page=5)
    client = _client(ehr, folder)
    if cursor.endswith("/e30"):
        cursor = cursor[: -len("e30")] + _b64({"k": -1})
    with pytest.raises(UpstreamBadResponse) as caught:
        await client.search("Observation", {"patient": PATIENT}, patient="p", page_size=5, next_url=cursor)
    assert caught.value.code == "upstream_bad_response"
    assert ehr.requests == []


def _b64(data: dict[str, Any]) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
