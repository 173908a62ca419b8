"""The SQLite sink keeps the same chain in a table, commits per batch and resumes on restart."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from mcp_fhir.audit.query import AuditQuery
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail
from mcp_fhir.audit.verify import verify_sqlite

from ..conftest import make_record, public_key_of, witness_of


async def test_the_sqlite_sink_stores_a_verifiable_chain_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    settings = AuditSettings(sink="sqlite", path=str(path))
    for round_ in range(2):
        trail = build_trail(settings)
        await trail.start()
        await asyncio.gather(*(trail.record(make_record(round_ * 100 + n)) for n in range(100)))
        assert trail.sink.commit_count < 100
        rows, _ = await trail.query(AuditQuery(patient="pat-2"), limit=100, cursor=None)
        assert rows
        await trail.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    report = verify_sqlite(path, public_key=public_key_of(settings), witness=witness_of(settings))
    assert report.ok, report.problem
    assert report.records == 200 and report.witness_checked


async def test_an_edited_sqlite_row_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    settings = AuditSettings(sink="sqlite", path=str(path))
    trail = build_trail(settings)
    await trail.start()
    for n in range(5):
        await trail.record(make_record(n))
    await trail.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE audit_log SET entry = replace(entry, 'pat-3', 'pat-9') WHERE seq = 7")
    conn.commit()
    conn.close()
    report = verify_sqlite(path, public_key=public_key_of(settings))
    assert (report.problem.kind, report.problem.seq) == ("edited", 7)  # record n=3 sits at seq 7


async def test_a_cut_sqlite_trail_is_caught_against_its_witness(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    settings = AuditSettings(sink="sqlite", path=str(path))
    trail = build_trail(settings)
    await trail.start()
    for n in range(5):
        await trail.record(make_record(n))
    await trail.close()
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM audit_log WHERE seq > 6")
    conn.commit()
    conn.close()
    report = verify_sqlite(path, public_key=public_key_of(settings), witness=witness_of(settings))
    assert (report.problem.kind, report.problem.seq) == ("truncated", 7)
