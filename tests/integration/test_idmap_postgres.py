"""The id-map behaviours of tests/ehr/test_idmap.py against a real PostgreSQL (MCP_FHIR_TEST_POSTGRES_DSN).

Start one with ``eval "$(scripts/services.sh start)"``. Without the variable the tests skip locally and fail
under CI. Each run uses its own schema, dropped afterwards.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.ehr.idmap import IdMap, PostgresIdMap

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

_spec = importlib.util.spec_from_file_location(
    "_idmap_behaviours", Path(__file__).resolve().parents[1] / "ehr" / "test_idmap.py"
)
assert _spec is not None and _spec.loader is not None
_behaviours = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_behaviours)
BEHAVIOURS = _behaviours.BEHAVIOURS


@pytest.fixture
async def pg_idmap(postgres_dsn: str) -> AsyncIterator[IdMap]:
    import psycopg

    schema = f"idmap_test_{uuid.uuid4().hex[:12]}"
    store = await PostgresIdMap.connect(postgres_dsn, schema=schema)
    try:
        yield store
    finally:
        await store.close()
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda b: b.__name__.removeprefix("check_"))
async def test_postgres_id_map_behaviour(pg_idmap: IdMap, behaviour) -> None:
    await behaviour(pg_idmap)


async def test_postgres_schema_creation_is_idempotent_and_data_persists(postgres_dsn: str) -> None:
    import psycopg

    schema = f"idmap_test_{uuid.uuid4().hex[:12]}"
    try:
        first = await PostgresIdMap.connect(postgres_dsn, schema=schema)
        await first.put("pat-1", "cerner", "cerner_id", "12724067")
        await first.close()
        second = await PostgresIdMap.connect(postgres_dsn, schema=schema)
        assert await second.canonicalise(backend="cerner", kind="cerner_id", value="12724067") == "pat-1"
        await second.close()
    finally:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def test_postgres_bad_table_name_is_a_config_error(postgres_dsn: str) -> None:
    with pytest.raises(ConfigError) as info:
        await PostgresIdMap.connect(postgres_dsn, table="idmap; drop table x")
    assert info.value.key == "idmap.postgres.table"


async def test_unreachable_postgres_is_a_config_error_naming_the_dsn_key() -> None:
    with pytest.raises(ConfigError) as info:
        await PostgresIdMap.connect("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1)
    assert info.value.key == "idmap.postgres.dsn"
