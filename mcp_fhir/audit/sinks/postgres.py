"""The PostgreSQL sink: one append-only table, a chain per writer, one transaction per batch.

Table (``setup_postgres_schema`` creates it: on the sink's first start when ``audit.pg_create_schema``
is true, the default, under an advisory lock so that replicas starting together do not race; or once,
by an administrator, with ``mcp-fhir audit init-postgres``, after which the writer needs no DDL rights)::

    audit_log(writer text, seq bigint, prev text, hash text, entry jsonb, PRIMARY KEY (writer, seq))

The writer role ``mcp_fhir_audit_writer`` holds INSERT and SELECT only. UPDATE, DELETE and
TRUNCATE are revoked, and triggers raise on UPDATE, DELETE and TRUNCATE for everyone (belt and
braces: even the owner must drop the trigger first, which is itself a logged DDL event).
The primary key stops two processes with the same writer id from forking a chain: the loser's
INSERT fails, its callers get audit_unavailable, and it re-reads the head before the next batch.

The entry is stored as ``jsonb``; verification recomputes hashes over canonical JSON of the
decoded entry, which is stable for the strings, integers, booleans and nulls records hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from mcp_fhir._secret import Secret
from mcp_fhir.audit.chain import ChainHead
from mcp_fhir.audit.sinks.base import AuditSink, Opened, SinkError

__all__ = ["WRITER_ROLE", "PostgresSink", "setup_postgres_schema"]

WRITER_ROLE = "mcp_fhir_audit_writer"
CONNECT_TIMEOUT_SECONDS = 5
READ_BATCH_ROWS = 1000
SETUP_LOCK_KEY = 0x6D6366_6175  # an arbitrary constant: serialises schema creation across replicas


def _table(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def setup_postgres_schema(
    dsn: str, *, schema: str = "public", table: str = "audit_log", role: str = WRITER_ROLE
) -> None:
    """Create the schema, the append-only table, its triggers and the writer role (run as an admin)."""
    t = _table(schema, table)
    fn = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(f"{table}_append_only"))
    statements = [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (writer text NOT NULL, seq bigint NOT NULL, prev text NOT NULL,"
            " hash text NOT NULL, entry jsonb NOT NULL, PRIMARY KEY (writer, seq))"
        ).format(t),
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'audit log is append-only' USING ERRCODE = 'insufficient_privilege'; END $$"
        ).format(fn),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(f"{table}_no_update_delete"), t),
        sql.SQL("CREATE TRIGGER {} BEFORE UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
            sql.Identifier(f"{table}_no_update_delete"), t, fn
        ),
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(f"{table}_no_truncate"), t),
        sql.SQL("CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(
            sql.Identifier(f"{table}_no_truncate"), t, fn
        ),
        sql.SQL(
            "DO $$ BEGIN CREATE ROLE {} NOLOGIN; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ).format(sql.Identifier(role)),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), sql.Identifier(role)),
        sql.SQL("REVOKE ALL ON {} FROM PUBLIC").format(t),
        sql.SQL("REVOKE ALL ON {} FROM {}").format(t, sql.Identifier(role)),
        sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(t, sql.Identifier(role)),
    ]
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))  # replicas starting together
            for stmt in statements:
                conn.execute(stmt)


class PostgresSink(AuditSink):
    """The chain of one writer in a PostgreSQL table."""

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        writer: str,
        *,
        schema: str = "public",
        table: str = "audit_log",
        role: str | None = None,
        create_schema: bool = False,
    ) -> None:
        super().__init__()
        self._dsn = Secret(dsn)  # it may hold a password: every printed form is [secret]
        self.create_schema = create_schema
        self.writer = writer
        self.schema = schema
        self.table = table
        self.role = role
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def __repr__(self) -> str:  # never the DSN: it may hold a password
        return f"PostgresSink(writer={self.writer!r}, table={self.schema}.{self.table})"

    async def open(self) -> Opened:
        await self.close()
        conn = await psycopg.AsyncConnection.connect(
            self._dsn.reveal(), autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
        try:
            cur = await conn.execute("SELECT to_regclass(%s)", (f'"{self.schema}"."{self.table}"',))
            found = await cur.fetchone()
            if not found or found[0] is None:
                if not self.create_schema:
                    raise SinkError(
                        "the audit table does not exist: run `mcp-fhir audit init-postgres` "
                        "or set audit.pg_create_schema"
                    )
                await asyncio.to_thread(
                    setup_postgres_schema, self._dsn.reveal(), schema=self.schema, table=self.table,
                    role=self.role or WRITER_ROLE,
                )  # fmt: skip
            if self.role:
                await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.role)))
            cur = await conn.execute(
                sql.SQL("SELECT seq, hash FROM {} WHERE writer = %s ORDER BY seq DESC LIMIT 1").format(
                    _table(self.schema, self.table)
                ),
                (self.writer,),
            )
            row = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return Opened(head=ChainHead(seq=int(row[0]), hash=str(row[1])) if row else ChainHead())

    async def append(self, entries: list[dict[str, Any]]) -> None:
        conn = self._conn
        if conn is None:
            raise SinkError("audit database is not connected")
        rows = [(self.writer, e["seq"], e["prev"], e["hash"], Jsonb(e)) for e in entries]
        query = sql.SQL("INSERT INTO {} (writer, seq, prev, hash, entry) VALUES (%s, %s, %s, %s, %s)").format(
            _table(self.schema, self.table)
        )
        async with conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(query, rows)
        self.commit_count += 1

    async def check(self) -> bool:
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            cur = await conn.execute(
                "SELECT has_table_privilege(current_user, %s, 'INSERT')",
                (f'"{self.schema}"."{self.table}"',),
            )
            row = await cur.fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass

    def reader(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        return self._entries(after_seq=after_seq)

    def reverse_reader(self) -> Iterator[dict[str, Any]]:
        return self._entries(newest_first=True)

    def _entries(self, *, after_seq: int = 0, newest_first: bool = False) -> Iterator[dict[str, Any]]:
        """Every entry of this writer's chain with ``seq > after_seq``, in order (blocking, server-side cursor).

        On a connection of its own, so it needs no ``open``: ``audit verify`` and the CLI read a chain here.
        """
        order = sql.SQL("DESC" if newest_first else "ASC")
        with psycopg.connect(self._dsn.reveal(), connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
            if self.role:
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(self.role)))
            with conn.cursor(name="mcp_fhir_audit_read") as cur:
                cur.itersize = READ_BATCH_ROWS
                cur.execute(
                    sql.SQL("SELECT entry FROM {} WHERE writer = %s AND seq > %s ORDER BY seq {}").format(
                        _table(self.schema, self.table), order
                    ),
                    (self.writer, after_seq),
                )
                for (entry,) in cur:
                    yield entry
