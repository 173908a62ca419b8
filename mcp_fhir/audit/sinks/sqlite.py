"""The SQLite sink: the same chain in one table, WAL journal, ``synchronous=FULL``, one COMMIT per batch.

One writer per database file (SQLite's own write lock enforces it). ``seq`` is the primary key,
so a second writer cannot fork the chain: its insert fails and the trail reports audit_unavailable.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcp_fhir.audit.chain import ChainHead, canonical_json
from mcp_fhir.audit.sinks.base import AuditSink, Opened, SinkError

__all__ = ["SQLiteSink", "iter_sqlite_entries"]

BUSY_TIMEOUT_SECONDS = 5.0
FILE_MODE = 0o600
SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq   INTEGER PRIMARY KEY,
    prev  TEXT NOT NULL,
    hash  TEXT NOT NULL,
    entry TEXT NOT NULL
)
"""


def iter_sqlite_entries(
    path: Path, after_seq: int = 0, *, newest_first: bool = False
) -> Iterator[dict[str, Any]]:
    """Every stored entry with ``seq > after_seq``, in seq order (read-only connection)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    order = "DESC" if newest_first else "ASC"
    try:
        query = f"SELECT entry FROM audit_log WHERE seq > ? ORDER BY seq {order}"  # noqa: S608 (fixed text)
        for (text,) in conn.execute(query, (after_seq,)):
            yield json.loads(text)
    finally:
        conn.close()


class SQLiteSink(AuditSink):
    """The chain in a SQLite table."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteSink(path={str(self.path)!r})"

    async def open(self) -> Opened:
        return await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> Opened:
        with self._lock:
            self._close_conn()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE)  # audit data: 0600 before SQLite
            os.close(fd)  # opens it; SQLite gives the -wal and -shm files the database file's mode
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(SCHEMA)
                row = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            return Opened(head=ChainHead(seq=row[0], hash=row[1]) if row else ChainHead())

    async def append(self, entries: list[dict[str, Any]]) -> None:
        rows = [(e["seq"], e["prev"], e["hash"], canonical_json(e).decode()) for e in entries]
        await asyncio.to_thread(self._append_sync, rows)

    def _append_sync(self, rows: list[tuple[int, str, str, str]]) -> None:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SinkError("audit database is not open")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO audit_log (seq, prev, hash, entry) VALUES (?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self.commit_count += 1

    async def check(self) -> bool:
        return await asyncio.to_thread(self._check_sync)

    def _check_sync(self) -> bool:
        with self._lock:
            if self._conn is None:
                return False
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                return False
            return True

    async def close(self) -> None:
        await asyncio.to_thread(self._close_locked)

    def _close_locked(self) -> None:
        with self._lock:
            self._close_conn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def reader(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        return iter_sqlite_entries(self.path, after_seq)

    def reverse_reader(self) -> Iterator[dict[str, Any]]:
        return iter_sqlite_entries(self.path, 0, newest_first=True)
