"""Issue #21 (1): consent directives are read, cached with a TTL, invalidated on write, and handed to the
policy in one normalised form. Python interprets nothing: the tests pin the normalised facts."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from mcp_fhir._exceptions import InvalidArgument
from mcp_fhir.consent import (
    ConsentReader,
    EhrConsentSource,
    MemoryConsentStore,
    PostgresConsentStore,
    SqliteConsentStore,
    normalise_consents,
)

DATA = Path(__file__).parent / "data" / "consent"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def test_a_nested_deny_for_one_practitioner_is_one_deny_provision_naming_that_actor():
    provisions = normalise_consents([load("spec-notThem.json")])
    assert [p["type"] for p in provisions] == ["permit", "deny"]
    deny = provisions[1]
    assert (deny["actor"], deny["actor_roles"]) == (["Practitioner/f204"], ["PRCP"])
    assert deny["action"] == ["access"]


def test_an_opt_out_policy_rule_makes_an_untyped_root_provision_a_deny():
    (provision,) = normalise_consents([load("spec-Out.json")])
    assert provision["type"] == "deny" and provision["actor_roles"] == ["CST"]


def test_a_time_limited_withholding_keeps_its_period_for_the_policy_to_judge():
    provisions = normalise_consents([load("spec-notTime.json")])
    # FHIR dates become the first and last instants of their days, for the policy to compare
    assert provisions[1]["period"] == {"start": "2024-01-01T00:00:00Z", "end": "2025-06-30T23:59:59.999Z"}


def test_a_withheld_instance_and_withheld_labels_are_named_in_the_provision():
    assert normalise_consents([load("spec-notThis.json")])[1]["data"] == [
        "DocumentReference/au-002-note-psych"
    ]
    assert normalise_consents([load("au-mhr-restricted.json")])[1]["security_labels"] == ["PSY", "R"]


def test_an_inactive_consent_and_other_resources_contribute_nothing():
    assert normalise_consents([load("inactive.json"), {"resourceType": "Patient", "id": "x"}]) == []


class CountingSource:
    def __init__(self, resources: list[dict[str, Any]] | Exception) -> None:
        self.resources = resources
        self.calls = 0

    async def directives(self, patient: str) -> list[dict[str, Any]]:
        self.calls += 1
        if isinstance(self.resources, Exception):
            raise self.resources
        return self.resources


async def test_directives_are_cached_for_their_ttl_and_read_again_after_it():
    now = [0.0]
    source = CountingSource([load("ai-opt-out.json")])
    reader = ConsentReader(source, ttl_seconds=30, clock=lambda: now[0])
    first = await reader.context("pat-au-002")
    assert first is not None and first["status"] == "ok" and len(first["provisions"]) == 2
    await reader.context("pat-au-002")
    assert source.calls == 1
    now[0] = 31
    await reader.context("pat-au-002")
    assert source.calls == 2


async def test_a_write_invalidates_the_cached_directives_of_that_patient():
    store = MemoryConsentStore()
    reader = ConsentReader(store, ttl_seconds=3600)
    assert (await reader.context("pat-au-002")) == {"status": "ok", "provisions": []}
    reader.invalidate(await store.put(load("ai-opt-out.json")))
    assert len((await reader.context("pat-au-002"))["provisions"]) == 2


async def test_a_source_that_fails_gives_the_policy_an_unavailable_status_and_is_not_cached():
    source = CountingSource(RuntimeError("down"))
    reader = ConsentReader(source)
    assert await reader.context("pat-au-002") == {"status": "unavailable", "provisions": []}
    await reader.context("pat-au-002")
    assert source.calls == 2


async def test_a_call_that_names_no_patient_has_no_consent_context():
    assert await ConsentReader(MemoryConsentStore()).context(None) is None


async def test_the_ehr_source_asks_the_ehr_for_the_backend_patient():
    asked: list[str] = []

    async def search(patient: str) -> list[dict[str, Any]]:
        asked.append(patient)
        return [load("spec-Out.json")]

    reader = ConsentReader(EhrConsentSource(search))
    assert (await reader.context("b-1"))["provisions"][0]["type"] == "deny"
    assert asked == ["b-1"]


async def test_the_sqlite_store_keeps_consents_by_patient_in_a_private_file(tmp_path: Path):
    store = SqliteConsentStore(tmp_path / "consent.db")
    try:
        await store.put(load("spec-Out.json"))
        await store.put(load("au-mhr-restricted.json"))
        await store.put({**load("spec-Out.json"), "patient": {"reference": "Patient/other"}})  # moved
        assert [c["id"] for c in await store.directives("pat-au-002")] == ["au-mhr-restricted"]
        assert [c["id"] for c in await store.directives("other")] == ["spec-out"]
    finally:
        await store.aclose()
    assert stat.S_IMODE((tmp_path / "consent.db").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "bad",
    [
        {"resourceType": "Patient", "id": "x"},
        {"resourceType": "Consent"},
        {"resourceType": "Consent", "id": "c"},
    ],
)
async def test_a_store_refuses_what_is_not_a_consent_for_a_named_patient(bad: dict[str, Any]):
    with pytest.raises(InvalidArgument) as exc:
        await MemoryConsentStore().put(bad)
    assert exc.value.code == "invalid_argument"


@pytest.mark.postgres
async def test_the_postgres_store_is_shared_by_two_replicas(postgres_dsn: str):
    a = await PostgresConsentStore.connect(postgres_dsn, table="test_consent_shared")
    b = await PostgresConsentStore.connect(postgres_dsn, table="test_consent_shared")
    try:
        await a.put(load("ai-opt-out.json"))
        assert [c["id"] for c in await b.directives("pat-au-002")] == ["ai-opt-out"]
    finally:
        await a.aclose()
        await b.aclose()
