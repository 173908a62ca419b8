"""The witness: the latest signed head of the chain, kept outside the trail, so that a cut end shows.

A hash chain cannot show that entries were cut from its end. The trail therefore copies its latest
signed checkpoint entry (``seq``, ``hash``, the checkpoint and its signature) to a second place
after every group commit, before any record of that batch is released. ``audit verify`` and the
writer's own start-up check the trail against it: a trail that ends before the witness, or holds a
different entry at the witness's seq, is ``truncated`` / ``witness_mismatch``.

Where it lives (``audit.witness``):

* ``file`` (default): a file in a directory beside, not inside, the audit directory
  (``<audit dir>-witness/<trail name>.witness.json``), mode 0600, two JSON slots written alternately
  in place. It is written after the trail's fsync and not fsynced itself: after a power loss it may
  be older than the trail, never newer, so it can only miss a cut, never raise a false one. Put it
  on another volume for real protection.
* ``redis``: one key per writer (``<key_prefix><writer>``); the URL comes from an environment variable.
* ``postgres``: one row per writer in ``<schema>.audit_witness``; the row only moves forward
  (an UPDATE to a lower seq changes nothing).

A witness an attacker can also write is no better than their restraint: see docs/security.md for
what each placement defends against. A witness is signed data (the checkpoint entry), so a forged
one fails verification; what a witness on the attacker's disk cannot stop is being rolled back.
A witness that cannot be written is logged and counted; it does not fail calls (the trail itself
was written), and it is retried on the next batch.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from mcp_fhir.audit.chain import canonical_json

__all__ = ["FileWitness", "PostgresWitness", "RedisWitness", "Witness", "witness_seq_hash"]

WITNESS_FILE_MODE = 0o600
WITNESS_SLOTS = 2
WITNESS_SLOT_BYTES = 2048
CONNECT_TIMEOUT_SECONDS = 5


def witness_seq_hash(entry: dict[str, Any] | None) -> tuple[int, str] | None:
    """``(seq, hash)`` of a witnessed entry, or None when there is none or it is malformed."""
    if not isinstance(entry, dict):
        return None
    try:
        return int(entry["seq"]), str(entry["hash"])
    except (KeyError, TypeError, ValueError):
        return None


class Witness(ABC):
    """One place outside the trail that holds the latest signed checkpoint entry of one writer."""

    name = "base"

    @abstractmethod
    def read(self) -> dict[str, Any] | None:
        """The witnessed checkpoint entry, or None when nothing was witnessed yet (blocking)."""

    @abstractmethod
    def write(self, entry: dict[str, Any]) -> None:
        """Record ``entry`` (a signed checkpoint entry) as the latest signed head (blocking)."""

    def close(self) -> None:
        """Release connections."""
        return None


class FileWitness(Witness):
    """A small file of two fixed-size slots, written alternately in place (one ``pwrite`` per batch).

    Replacing a file by rename costs a data flush on ext4 (``auto_da_alloc``), milliseconds per
    batch; an in-place write of one slot costs microseconds. Two slots mean that a write torn by a
    crash leaves the other, older head readable: ``read`` returns the valid slot with the higher seq.
    """

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._next_slot = 0

    def __repr__(self) -> str:
        return f"FileWitness(path={str(self.path)!r})"

    def read(self) -> dict[str, Any] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        best: dict[str, Any] | None = None
        for n in range(WITNESS_SLOTS):
            try:
                entry = json.loads(data[n * WITNESS_SLOT_BYTES : (n + 1) * WITNESS_SLOT_BYTES])
            except ValueError:
                continue
            seen = witness_seq_hash(entry)
            if seen is not None and (best is None or seen[0] > int(best["seq"])):
                best = entry
        return best if best is not None else {}

    def write(self, entry: dict[str, Any]) -> None:
        body = canonical_json(entry)
        if len(body) >= WITNESS_SLOT_BYTES:
            raise ValueError("witness entry does not fit its slot")
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), WITNESS_FILE_MODE)
            os.fchmod(fd, WITNESS_FILE_MODE)
            self._fd = fd
        slot = body + b"\n" + b" " * (WITNESS_SLOT_BYTES - len(body) - 1)
        os.pwrite(self._fd, slot, self._next_slot * WITNESS_SLOT_BYTES)
        self._next_slot = (self._next_slot + 1) % WITNESS_SLOTS

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RedisWitness(Witness):
    """One Redis key per writer."""

    name = "redis"

    def __init__(self, url: str, key: str) -> None:
        import redis

        self.key = key
        self._client = redis.Redis.from_url(
            url, socket_timeout=CONNECT_TIMEOUT_SECONDS, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS
        )

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"RedisWitness(key={self.key!r})"

    def read(self) -> dict[str, Any] | None:
        raw = self._client.get(self.key)
        if raw is None:
            return None
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}

    def write(self, entry: dict[str, Any]) -> None:
        self._client.set(self.key, canonical_json(entry))

    def close(self) -> None:
        self._client.close()


class PostgresWitness(Witness):
    """One row per writer in ``<schema>.<table>``; it only moves forward."""

    name = "postgres"

    def __init__(
        self, dsn: str, writer: str, *, schema: str = "public", table: str = "audit_witness"
    ) -> None:
        self._dsn = dsn
        self.writer = writer
        self.schema = schema
        self.table = table
        self._conn: Any = None

    def __repr__(self) -> str:  # never the DSN
        return f"PostgresWitness(writer={self.writer!r}, table={self.schema}.{self.table})"

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)
            self._conn.execute(self._sql(
                "CREATE TABLE IF NOT EXISTS {} (writer text PRIMARY KEY, seq bigint NOT NULL, "
                "hash text NOT NULL, entry jsonb NOT NULL)"
            ))  # fmt: skip
        return self._conn

    def _sql(self, text: str) -> Any:
        from psycopg import sql

        return sql.SQL(text).format(
            sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))
        )

    def read(self) -> dict[str, Any] | None:
        row = (
            self._connection()
            .execute(self._sql("SELECT entry FROM {} WHERE writer = %s"), (self.writer,))
            .fetchone()
        )
        return dict(row[0]) if row else None

    def write(self, entry: dict[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        self._connection().execute(
            self._sql(
                "INSERT INTO {} AS w (writer, seq, hash, entry) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
                "entry = excluded.entry WHERE w.seq < excluded.seq"
            ),
            (self.writer, int(entry["seq"]), str(entry["hash"]), Jsonb(entry)),
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
