"""Patient-ID map behaviour, run against MemoryIdMap and SqliteIdMap here and PostgresIdMap in
tests/integration/test_idmap_postgres.py (which reuses the ``check_*`` behaviours below)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcp_fhir._exceptions import ConfigError, InvalidArgument, UnknownPatient
from mcp_fhir.ehr.idmap import (
    IdMap,
    IdMapConflict,
    IdMapEntry,
    MemoryIdMap,
    SqliteIdMap,
    load_idmap_yaml,
    seed_idmap,
)
from mcp_fhir.metrics import IDMAP_MISMATCHES

IHI = "8003608833357361"  # AU Base patient-example0.xml
MEDICARE = "69518257911"  # au-fhir-test-data Patient-bassett-imogene-betsy.json


# -- behaviours shared with the PostgreSQL integration test ---------------------------------------------


async def check_put_then_lookup_both_ways(idmap: IdMap) -> None:
    await idmap.put("pat-1", "epic", "epic_fhir_id", "eJzlzKe3KPzAV5TtkxmNivQ3")
    await idmap.put("pat-1", "epic", "mrn", "202497")
    await idmap.put("pat-1", "cerner", "cerner_id", "12724067")
    assert await idmap.canonicalise(backend="epic", kind="mrn", value="202497") == "pat-1"
    assert await idmap.canonicalise(backend="cerner", kind="cerner_id", value="12724067") == "pat-1"
    assert await idmap.backend_id("pat-1", "epic", "epic_fhir_id") == "eJzlzKe3KPzAV5TtkxmNivQ3"
    assert await idmap.backend_id("pat-1", "cerner", "cerner_id") == "12724067"


async def check_unmapped_lookups_raise_unknown_patient_and_are_counted(idmap: IdMap) -> None:
    await idmap.put("pat-2", "epic", "mrn", "111")
    before = IDMAP_MISMATCHES.labels(backend="epic")._value.get()
    with pytest.raises(UnknownPatient) as info:
        await idmap.canonicalise(backend="epic", kind="mrn", value="999")
    assert info.value.code == "unknown_patient"
    assert "999" not in str(info.value) and "999" not in repr(info.value.to_dict())
    with pytest.raises(UnknownPatient):
        await idmap.backend_id("pat-2", "epic", "fhir_id")
    with pytest.raises(UnknownPatient):
        await idmap.canonicalise(backend="cerner", kind="mrn", value="111")  # another backend: no guess
    assert IDMAP_MISMATCHES.labels(backend="epic")._value.get() == before + 2


async def check_conflicting_puts_are_rejected_and_identical_puts_are_noops(idmap: IdMap) -> None:
    await idmap.put("pat-3", "epic", "mrn", "333")
    await idmap.put("pat-3", "epic", "mrn", "333")
    with pytest.raises(IdMapConflict) as info:
        await idmap.put("pat-4", "epic", "mrn", "333")
    assert info.value.code == "config_invalid"
    with pytest.raises(IdMapConflict):
        await idmap.put("pat-3", "epic", "mrn", "334")
    assert await idmap.canonicalise(backend="epic", kind="mrn", value="333") == "pat-3"


async def check_national_ids_are_validated_and_found_from_any_backend(idmap: IdMap) -> None:
    await idmap.put("pat-5", None, "ihi", f"{IHI[:4]} {IHI[4:8]} {IHI[8:12]} {IHI[12:]}")
    await idmap.put("pat-5", None, "medicare", MEDICARE)
    assert await idmap.canonicalise(backend=None, kind="ihi", value=IHI) == "pat-5"
    assert await idmap.canonicalise(backend="au_gp", kind="ihi", value=IHI) == "pat-5"
    assert await idmap.backend_id("pat-5", "au_gp", "medicare") == MEDICARE
    with pytest.raises(InvalidArgument) as info:
        await idmap.put("pat-5", None, "ihi", IHI[:-1] + "0")
    assert info.value.argument == "value"
    with pytest.raises(InvalidArgument):
        await idmap.put("pat-6", None, "medicare", "6951449677")


async def check_bad_arguments_are_rejected(idmap: IdMap) -> None:
    with pytest.raises(InvalidArgument) as info:
        await idmap.put("bad id!", "epic", "mrn", "1")
    assert info.value.argument == "canonical"
    with pytest.raises(InvalidArgument) as info:
        await idmap.put("p" * 65, "epic", "mrn", "1")
    assert info.value.argument == "canonical"
    with pytest.raises(InvalidArgument) as info:
        await idmap.put("pat-7", "epic", "ssn", "1")
    assert info.value.argument == "kind"
    with pytest.raises(InvalidArgument) as info:
        await idmap.canonicalise(backend="epic; DROP TABLE", kind="mrn", value="1")
    assert info.value.argument == "backend"
    with pytest.raises(InvalidArgument):
        await idmap.canonicalise(backend="epic", kind="mrn", value="")


BEHAVIOURS = [
    check_put_then_lookup_both_ways,
    check_unmapped_lookups_raise_unknown_patient_and_are_counted,
    check_conflicting_puts_are_rejected_and_identical_puts_are_noops,
    check_national_ids_are_validated_and_found_from_any_backend,
    check_bad_arguments_are_rejected,
]


@pytest.fixture(params=["memory", "sqlite"])
async def idmap(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdMap]:
    store: IdMap = MemoryIdMap() if request.param == "memory" else SqliteIdMap(tmp_path / "idmap.db")
    yield store
    await store.close()


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda b: b.__name__.removeprefix("check_"))
async def test_id_map_behaviour(idmap: IdMap, behaviour) -> None:
    await behaviour(idmap)


async def test_sqlite_map_survives_a_reopen(tmp_path: Path) -> None:
    first = SqliteIdMap(tmp_path / "idmap.db")
    await first.put("pat-1", "epic", "mrn", "202497")
    await first.close()
    second = SqliteIdMap(tmp_path / "idmap.db")
    assert await second.canonicalise(backend="epic", kind="mrn", value="202497") == "pat-1"
    await second.close()


def test_sqlite_map_on_an_unusable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SqliteIdMap(tmp_path / "missing-dir" / "idmap.db")
    assert info.value.key == "idmap.sqlite.path"


async def test_yaml_seed_is_loaded_and_applied(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        "- canonical: pat-1\n"
        "  ids:\n"
        "    epic: {mrn: '202497', epic_fhir_id: eJzlzKe3KPzAV5TtkxmNivQ3}\n"
        "    cerner: {cerner_id: '12724067'}\n"
        f"    '*': {{ihi: '{IHI}'}}\n"
    )
    entries = load_idmap_yaml(seed)
    assert len(entries) == 4
    idmap = MemoryIdMap()
    assert await seed_idmap(idmap, entries) == 4
    assert await idmap.canonicalise(backend="cerner", kind="cerner_id", value="12724067") == "pat-1"
    assert await idmap.canonicalise(backend=None, kind="ihi", value=IHI) == "pat-1"
    assert IHI not in repr(entries)


async def test_a_seed_entry_that_contradicts_the_map_is_skipped_and_the_stored_mapping_stands() -> None:
    idmap = MemoryIdMap()
    await idmap.put("pat-1", "epic", "mrn", "202497")
    entries = [IdMapEntry("pat-2", "epic", "mrn", "202497"), IdMapEntry("pat-2", "epic", "mrn", "777")]
    assert await seed_idmap(idmap, entries) == 1
    assert await idmap.canonicalise(backend="epic", kind="mrn", value="202497") == "pat-1"
    assert await idmap.canonicalise(backend="epic", kind="mrn", value="777") == "pat-2"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("not: a list\n", "idmap.seed"),
        ("- canonical: 'bad id'\n  ids: {epic: {mrn: '1'}}\n", "idmap.seed[0].canonical"),
        ("- canonical: p1\n  ids: {epic: {ssn: '1'}}\n", "idmap.seed[0].ids.epic.ssn"),
        ("- canonical: p1\n  ids: {'*': {ihi: '8003608833357360'}}\n", "idmap.seed[0].ids.*.ihi"),
        ("- canonical: p1\n", "idmap.seed[0]"),
        ("- [unclosed\n", "idmap.seed"),
    ],
)
def test_bad_yaml_seed_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_idmap_yaml(seed)
    assert info.value.key == key
