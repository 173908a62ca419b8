"""The PostgreSQL audit sink against a real server: concurrency, append-only role, failure and recovery,
the schema made on first start, and the PostgreSQL and Redis witnesses that catch a cut chain."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from mcp_fhir._exceptions import AuditUnavailable
from mcp_fhir.audit.crypto import CheckpointSigner, load_or_create_signing_key
from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.sinks.postgres import WRITER_ROLE, PostgresSink, setup_postgres_schema
from mcp_fhir.audit.trail import AuditTrail, build_trail
from mcp_fhir.audit.verify import verify_postgres
from mcp_fhir.audit.witness import PostgresWitness, RedisWitness
from mcp_fhir.cli.audit import main
from tests.conftest import require_env

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

CONCURRENT_CALLS = 2000
GATHER_BATCH = 250


def _record(n: int, **kw):
    from mcp_fhir.audit.record import AuditRecord

    return AuditRecord(ts="2026-11-25T03:04:05.123Z", request_id=f"req-{n}", subject_id="agent-pg",
                       patient=f"pat-{n % 9}", tool="read_patient", operation="read", **kw)  # fmt: skip


@pytest.fixture
def dsn(postgres_dsn: str) -> str:
    return postgres_dsn


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    name = f"audit_test_{uuid.uuid4().hex[:12]}"
    setup_postgres_schema(dsn, schema=name)
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def _trail(dsn: str, schema: str, tmp_path: Path, writer: str = "pg-writer", **kw) -> AuditTrail:
    key, _ = load_or_create_signing_key(tmp_path / "signing.pem")
    sink = PostgresSink(dsn, writer, schema=schema, role=WRITER_ROLE)
    return AuditTrail(sink, signer=CheckpointSigner(key), writer_id=writer, **kw)


def _pub(tmp_path: Path) -> bytes:
    return (tmp_path / "signing.pem.pub").read_bytes()


async def test_two_thousand_concurrent_records_land_in_postgres_and_verify(
    dsn: str, schema: str, tmp_path: Path
) -> None:
    trail = _trail(dsn, schema, tmp_path)
    await trail.start()
    for start in range(0, CONCURRENT_CALLS, GATHER_BATCH):
        await asyncio.gather(*(trail.record(_record(n)) for n in range(start, start + GATHER_BATCH)))
    assert trail.sink.commit_count < CONCURRENT_CALLS
    rows, _ = await trail.query(AuditQuery(patient="pat-4"), limit=1000, cursor=None)
    assert len(rows) == len([n for n in range(CONCURRENT_CALLS) if n % 9 == 4])
    await trail.close()
    with psycopg.connect(dsn) as conn:
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.audit_log WHERE entry ? 'record'").format(sql.Identifier(schema))
        ).fetchone()[0]
    assert count == CONCURRENT_CALLS
    report = verify_postgres(dsn, "pg-writer", schema=schema, public_key=_pub(tmp_path))
    assert report.ok, report.problem
    assert report.records == CONCURRENT_CALLS and 1 <= report.checkpoints == trail.sink.commit_count


async def test_a_restarted_writer_resumes_its_own_chain(dsn: str, schema: str, tmp_path: Path) -> None:
    for _ in range(2):
        trail = _trail(dsn, schema, tmp_path)
        await trail.start()
        await asyncio.gather(*(trail.record(_record(n)) for n in range(20)))
        await trail.close()
    other = _trail(dsn, schema, tmp_path, writer="other-writer")
    await other.start()
    await other.record(_record(1))
    await other.close()
    report = verify_postgres(dsn, "pg-writer", schema=schema, public_key=_pub(tmp_path))
    assert report.ok, report.problem
    assert report.records == 40
    assert verify_postgres(dsn, "other-writer", schema=schema, public_key=_pub(tmp_path)).records == 1


async def test_the_cli_reads_one_writers_chain_from_postgres(
    dsn: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for writer in ("pg-writer", "other-writer"):
        trail = _trail(dsn, schema, tmp_path, writer=writer)
        await trail.start()
        await asyncio.gather(*(trail.record(_record(n)) for n in range(5)))
        await trail.close()
    monkeypatch.setenv("AUDIT_CLI_DSN", dsn)
    argv = ["--dsn-env", "AUDIT_CLI_DSN", "--writer", "pg-writer", "--schema", schema]
    pub = str(tmp_path / "signing.pem.pub")
    assert main(["audit", "verify", *argv, "--public-key", pub, "--no-witness", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["records"] == 5


async def test_the_writer_role_cannot_update_delete_or_truncate(
    dsn: str, schema: str, tmp_path: Path
) -> None:
    trail = _trail(dsn, schema, tmp_path)
    await trail.start()
    await trail.record(_record(1))
    await trail.close()
    table = sql.SQL("{}.audit_log").format(sql.Identifier(schema))
    attempts = [
        sql.SQL("UPDATE {} SET hash = 'x'").format(table),
        sql.SQL("DELETE FROM {}").format(table),
        sql.SQL("TRUNCATE {}").format(table),
    ]
    for stmt in attempts:
        with psycopg.connect(dsn) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(WRITER_ROLE)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
    # Belt and braces: even the table owner is stopped by the trigger.
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(sql.SQL("UPDATE {} SET hash = 'x'").format(table))
    assert verify_postgres(dsn, "pg-writer", schema=schema, public_key=_pub(tmp_path)).ok


async def test_revoking_insert_makes_record_fail_and_granting_it_back_recovers(
    dsn: str, schema: str, tmp_path: Path
) -> None:
    trail = _trail(dsn, schema, tmp_path)
    await trail.start()
    await trail.record(_record(1))
    table = sql.SQL("{}.audit_log").format(sql.Identifier(schema))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE INSERT ON {} FROM {}").format(table, sql.Identifier(WRITER_ROLE)))
    with pytest.raises(AuditUnavailable) as caught:
        await trail.record(_record(2))
    assert caught.value.code == "audit_unavailable"
    assert not await trail.check()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT INSERT ON {} TO {}").format(table, sql.Identifier(WRITER_ROLE)))
    assert await trail.check()
    await trail.record(_record(3))
    await trail.close()
    report = verify_postgres(dsn, "pg-writer", schema=schema, public_key=_pub(tmp_path))
    assert report.ok, report.problem
    assert report.records == 2


async def test_build_trail_reads_the_dsn_from_the_named_environment_variable(
    dsn: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_AUDIT_DSN", dsn)
    settings = AuditSettings(sink="postgres", dsn_env="TEST_AUDIT_DSN", pg_schema=schema, pg_role=WRITER_ROLE,
                             writer_id="from-settings", signing_key_file=str(tmp_path / "k.pem"),
                             witness_path=str(tmp_path / "witness.json"))  # fmt: skip
    trail = build_trail(settings)
    assert dsn not in repr(trail)
    await trail.start()
    await trail.record(_record(1))
    assert await trail.check()
    await trail.close()
    pub = (tmp_path / "k.pem.pub").read_bytes()
    assert verify_postgres(dsn, "from-settings", schema=schema, public_key=pub).records == 1


@pytest.fixture
def fresh_schema(dsn: str) -> Iterator[str]:
    name = f"audit_fresh_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


async def test_the_audit_schema_is_created_on_first_start_when_missing(
    dsn: str, fresh_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_AUDIT_DSN", dsn)
    settings = AuditSettings(sink="postgres", dsn_env="TEST_AUDIT_DSN", pg_schema=fresh_schema,
                             pg_role=WRITER_ROLE, signing_key_file=str(tmp_path / "k.pem"),
                             witness="none", writer_state_dir=str(tmp_path))  # fmt: skip
    trails = [build_trail(settings) for _ in range(2)]  # two replicas starting together
    await asyncio.gather(*(t.start() for t in trails))
    await asyncio.gather(*(t.record(_record(n)) for n, t in enumerate(trails)))
    assert trails[0].writer_id != trails[1].writer_id  # per-process writer ids: no collision
    for t in trails:
        await t.close()
    table = sql.SQL("{}.audit_log").format(sql.Identifier(fresh_schema))
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(sql.SQL("DELETE FROM {}").format(table))  # append-only, as init-postgres makes it
    pub = (tmp_path / "k.pem.pub").read_bytes()
    for t in trails:
        assert verify_postgres(dsn, t.writer_id, schema=fresh_schema, public_key=pub).ok


async def test_without_schema_creation_a_missing_table_fails_closed(
    dsn: str, fresh_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_AUDIT_DSN", dsn)
    settings = AuditSettings(sink="postgres", dsn_env="TEST_AUDIT_DSN", pg_schema=fresh_schema,
                             pg_create_schema=False, signing_key_file=str(tmp_path / "k.pem"),
                             witness="none", writer_state_dir=str(tmp_path))  # fmt: skip
    trail = build_trail(settings)
    with pytest.raises(AuditUnavailable):
        await trail.start()
    await trail.close()


def _cut_chain(dsn: str, schema: str, writer: str, keep: int) -> None:
    """What the database owner can do: drop the trigger and delete the end of a chain."""
    table = sql.SQL("{}.audit_log").format(sql.Identifier(schema))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(table))
        conn.execute(sql.SQL("DELETE FROM {} WHERE writer = %s AND seq > %s").format(table), (writer, keep))


@pytest.mark.parametrize("kind", ["postgres", "redis"])
async def test_a_chain_cut_by_the_database_owner_is_caught_against_an_outside_witness(
    dsn: str, schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv("TEST_AUDIT_DSN", dsn)
    writer = f"w-{uuid.uuid4().hex[:8]}"
    if kind == "redis":
        monkeypatch.setenv("TEST_WITNESS_URL", require_env("MCP_FHIR_TEST_REDIS_URL"))
        extra = {"witness": "redis", "witness_url_env": "TEST_WITNESS_URL",
                 "witness_key_prefix": f"test-{uuid.uuid4().hex[:8]}:"}  # fmt: skip
    else:
        extra = {"witness": "postgres", "witness_dsn_env": "TEST_AUDIT_DSN", "witness_pg_schema": schema}
    settings = AuditSettings(sink="postgres", dsn_env="TEST_AUDIT_DSN", pg_schema=schema, writer_id=writer,
                             signing_key_file=str(tmp_path / "k.pem"), **extra)  # fmt: skip
    trail = build_trail(settings)
    await trail.start()
    for n in range(5):
        await trail.record(_record(n))
    await trail.close()
    witness: PostgresWitness | RedisWitness
    if kind == "redis":
        witness = RedisWitness(
            require_env("MCP_FHIR_TEST_REDIS_URL"), f"{extra['witness_key_prefix']}{writer}"
        )
    else:
        witness = PostgresWitness(dsn, writer, schema=schema)
    seen = witness.read()
    assert seen is not None and seen["seq"] == 10
    pub = (tmp_path / "k.pem.pub").read_bytes()
    assert verify_postgres(dsn, writer, schema=schema, public_key=pub, witness=seen).ok
    _cut_chain(dsn, schema, writer, keep=6)
    report = verify_postgres(dsn, writer, schema=schema, public_key=pub, witness=witness.read())
    witness.close()
    assert (report.problem.kind, report.problem.seq) == ("truncated", 7)
    restarted = build_trail(settings)
    with pytest.raises(AuditUnavailable):
        await restarted.start()  # and the writer will not sign over the cut
    await restarted.close()
