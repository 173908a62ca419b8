"""The patient-ID map: one canonical patient id ↔ each backend's ids. We never guess.

    IdMap (Protocol)
    ├── MemoryIdMap      in-process fake for unit tests
    ├── SqliteIdMap      default; stdlib sqlite3 in WAL mode, blocking calls run in a worker thread
    └── PostgresIdMap    psycopg 3 async, one connection behind a lock, schema created idempotently

A mapping row is ``(canonical, backend, kind, value)``. Kinds are a closed set (:data:`KINDS`). National
identifiers (``ihi``, ``medicare``) may be stored for no particular backend (``backend=None``, stored as
``"*"``); ``canonicalise`` with a backend falls back to those national rows.

Rules:

* canonical ids follow the FHIR id grammar ``[A-Za-z0-9\\-.]{1,64}``; IHI and Medicare values are checked
  (Luhn / Medicare check digit) on ``put``; bad input → ``InvalidArgument`` naming the argument.
* an unmapped lookup raises ``UnknownPatient`` (code ``unknown_patient``), counts
  ``IDMAP_MISMATCHES{backend}`` and logs the backend and kind only, never the value (PHI).
* a conflicting ``put`` raises :class:`IdMapConflict` (a ``ConfigError``, code ``config_invalid``, key
  ``idmap``): either the same (backend, kind, value) already belongs to another canonical id, or the canonical
  id already has a different value of that kind on that backend. Re-putting an identical row is a no-op.
  Both are data errors an operator must resolve; silently re-pointing a patient id would be a safety bug.
* a database failure at run time raises :class:`IdMapUnavailable` (code ``idmap_unavailable``): the call
  cannot be canonicalised, so it fails closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from mcp_fhir._exceptions import ConfigError, IdMapUnavailable, InvalidArgument, UnknownPatient
from mcp_fhir.ehr.au_identifiers import is_valid_ihi, is_valid_medicare, normalise_number
from mcp_fhir.metrics import IDMAP_MISMATCHES

__all__ = [
    "ANY_BACKEND",
    "KINDS",
    "IdMap",
    "IdMapConflict",
    "IdMapEntry",
    "IdMapUnavailable",
    "MemoryIdMap",
    "PostgresIdMap",
    "SqliteIdMap",
    "load_idmap_yaml",
    "seed_idmap",
]

logger = logging.getLogger(__name__)

KINDS = frozenset({"fhir_id", "mrn", "epic_fhir_id", "cerner_id", "gp_id", "ihi", "medicare"})
NATIONAL_KINDS = frozenset({"ihi", "medicare"})
ANY_BACKEND = "*"
MAX_VALUE_LENGTH = 256
DEFAULT_SQLITE_TIMEOUT = 5.0
DEFAULT_PG_CONNECT_TIMEOUT = 5.0
DEFAULT_PG_TABLE = "mcp_fhir_idmap"
_CANONICAL = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_BACKEND = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_SQL_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class IdMapConflict(ConfigError):
    """A ``put`` would make one id point at two patients (or a patient at two ids of one kind)."""

    def __init__(self, rule: str) -> None:
        super().__init__("idmap", rule)


@runtime_checkable
class IdMap(Protocol):
    """Canonical patient id ↔ backend ids."""

    async def canonicalise(self, *, backend: str | None, kind: str, value: str) -> str: ...

    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str: ...

    async def put(self, canonical: str, backend: str | None, kind: str, value: str) -> None: ...

    async def close(self) -> None: ...


# -- validation shared by every implementation ----------------------------------------------------------


def _check_canonical(canonical: str) -> str:
    if not isinstance(canonical, str) or not _CANONICAL.match(canonical):
        raise InvalidArgument("canonical", "must match the FHIR id grammar [A-Za-z0-9-.]{1,64}")
    return canonical


def _check_backend(backend: str | None) -> str:
    if backend is None or backend == ANY_BACKEND:
        return ANY_BACKEND
    if not isinstance(backend, str) or not _BACKEND.match(backend):
        raise InvalidArgument("backend", "must be 1-64 letters, digits, '_' or '-'")
    return backend


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidArgument("kind", f"must be one of {sorted(KINDS)}")
    return kind


def _clean_value(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_VALUE_LENGTH:
        raise InvalidArgument("value", f"must be a non-empty string of at most {MAX_VALUE_LENGTH} characters")
    return normalise_number(value) if kind in NATIONAL_KINDS else value.strip()


def _check_put_value(kind: str, value: str) -> str:
    cleaned = _clean_value(kind, value)
    if kind == "ihi" and not is_valid_ihi(cleaned):
        raise InvalidArgument("value", "an IHI must be 16 digits with prefix 800360 and a valid Luhn digit")
    if kind == "medicare" and not is_valid_medicare(cleaned):
        raise InvalidArgument("value", "a Medicare number must be 10 or 11 digits with a valid check digit")
    return cleaned


def _unknown(backend: str, kind: str) -> UnknownPatient:
    IDMAP_MISMATCHES.labels(backend=backend).inc()
    logger.warning("idmap: no mapping for backend=%s kind=%s", backend, kind)
    return UnknownPatient("patient id has no mapping; ids are never guessed", backend=backend, kind=kind)


async def _found(find: Callable[[str], Awaitable[str | None]], backend: str, kind: str) -> str:
    """``find`` under ``backend``, then (national identifiers only) under any backend; UnknownPatient if neither."""
    found = await find(backend)
    if found is None and backend != ANY_BACKEND and kind in NATIONAL_KINDS:
        found = await find(ANY_BACKEND)
    if found is None:
        raise _unknown(backend, kind)
    return found


class _IdMapBase:
    """The behaviour; subclasses provide three storage primitives."""

    _lock: asyncio.Lock

    async def find_canonical(self, backend: str, kind: str, value: str) -> str | None:
        raise NotImplementedError

    async def find_value(self, canonical: str, backend: str, kind: str) -> str | None:
        raise NotImplementedError

    async def insert(self, canonical: str, backend: str, kind: str, value: str) -> None:
        raise NotImplementedError

    async def canonicalise(self, *, backend: str | None, kind: str, value: str) -> str:
        """The canonical id for a backend's id; UnknownPatient when unmapped."""
        stored_backend = _check_backend(backend)
        _check_kind(kind)
        cleaned = _clean_value(kind, value)
        return await _found(lambda b: self.find_canonical(b, kind, cleaned), stored_backend, kind)

    async def backend_id(self, canonical: str, backend: str, kind: str = "fhir_id") -> str:
        """The backend's id of one kind for a canonical patient; UnknownPatient when unmapped."""
        _check_canonical(canonical)
        stored_backend = _check_backend(backend)
        _check_kind(kind)
        return await _found(lambda b: self.find_value(canonical, b, kind), stored_backend, kind)

    async def put(self, canonical: str, backend: str | None, kind: str, value: str) -> None:
        """Record one mapping; idempotent for an identical row, IdMapConflict for a contradicting one."""
        _check_canonical(canonical)
        stored_backend = _check_backend(backend)
        _check_kind(kind)
        cleaned = _check_put_value(kind, value)
        async with self._lock:
            owner = await self.find_canonical(stored_backend, kind, cleaned)
            if owner is not None:
                if owner != canonical:
                    raise IdMapConflict("this backend id is already mapped to another canonical patient")
                return
            if await self.find_value(canonical, stored_backend, kind) is not None:
                raise IdMapConflict("this canonical patient already has a different id of this kind")
            await self.insert(canonical, stored_backend, kind, cleaned)


class MemoryIdMap(_IdMapBase):
    """An in-process map for unit tests and small demos."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._by_value: dict[tuple[str, str, str], str] = {}
        self._by_canonical: dict[tuple[str, str, str], str] = {}

    async def find_canonical(self, backend: str, kind: str, value: str) -> str | None:
        return self._by_value.get((backend, kind, value))

    async def find_value(self, canonical: str, backend: str, kind: str) -> str | None:
        return self._by_canonical.get((canonical, backend, kind))

    async def insert(self, canonical: str, backend: str, kind: str, value: str) -> None:
        self._by_value[(backend, kind, value)] = canonical
        self._by_canonical[(canonical, backend, kind)] = value

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    canonical TEXT NOT NULL,
    backend   TEXT NOT NULL,
    kind      TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (backend, kind, value),
    UNIQUE (canonical, backend, kind)
)
"""


class SqliteIdMap(_IdMapBase):
    """The default map: one SQLite file in WAL mode; each call runs in a worker thread under a lock."""

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_SQLITE_TIMEOUT) -> None:
        if timeout <= 0:
            raise ConfigError("idmap.sqlite.timeout", "must be positive")
        self._lock = asyncio.Lock()
        self._db_lock = threading.Lock()
        try:
            if str(path) != ":memory:":  # PHI: create it 0600 first; SQLite gives -wal/-shm the same mode
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            self._conn = sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(_SCHEMA.format(table="idmap"))
            self._conn.commit()
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError("idmap.sqlite.path", "cannot open or initialise the database") from exc

    def _run(self, sql: str, params: Sequence[Any], *, write: bool = False) -> list[tuple[Any, ...]]:
        with self._db_lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
                if write:
                    self._conn.commit()
                return rows
            except sqlite3.IntegrityError as exc:
                self._conn.rollback()
                raise IdMapConflict("a concurrent write mapped this id differently") from exc
            except sqlite3.Error as exc:
                raise IdMapUnavailable("the id map database failed") from exc

    async def _one(self, sql: str, params: Sequence[Any]) -> str | None:
        rows = await asyncio.to_thread(self._run, sql, params)
        return str(rows[0][0]) if rows else None

    async def find_canonical(self, backend: str, kind: str, value: str) -> str | None:
        sql = "SELECT canonical FROM idmap WHERE backend = ? AND kind = ? AND value = ?"
        return await self._one(sql, (backend, kind, value))

    async def find_value(self, canonical: str, backend: str, kind: str) -> str | None:
        sql = "SELECT value FROM idmap WHERE canonical = ? AND backend = ? AND kind = ?"
        return await self._one(sql, (canonical, backend, kind))

    async def insert(self, canonical: str, backend: str, kind: str, value: str) -> None:
        sql = "INSERT INTO idmap (canonical, backend, kind, value) VALUES (?, ?, ?, ?)"
        await asyncio.to_thread(self._run, sql, (canonical, backend, kind, value), write=True)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._db_lock:
            self._conn.close()


class PostgresIdMap(_IdMapBase):
    """A shared map in PostgreSQL (psycopg 3 async). Build with :meth:`connect`."""

    def __init__(self, conn: Any, table: str) -> None:
        self._conn = conn
        self._table = table
        self._lock = asyncio.Lock()
        self._io_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        table: str = DEFAULT_PG_TABLE,
        schema: str | None = None,
        connect_timeout: float = DEFAULT_PG_CONNECT_TIMEOUT,
    ) -> PostgresIdMap:
        """Open one connection and create the table if it does not exist."""
        import psycopg

        if not _SQL_IDENT.match(table):
            raise ConfigError("idmap.postgres.table", "must be a lower-case SQL identifier")
        if schema is not None and not _SQL_IDENT.match(schema):
            raise ConfigError("idmap.postgres.schema", "must be a lower-case SQL identifier")
        if connect_timeout <= 0:
            raise ConfigError("idmap.postgres.connect_timeout", "must be positive")
        qualified = f"{schema}.{table}" if schema else table
        try:
            conn = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout))
            )
            if schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(_SCHEMA.format(table=qualified))
        except psycopg.Error as exc:
            raise ConfigError("idmap.postgres.dsn", "cannot connect or create the id map table") from exc
        return cls(conn, qualified)

    async def _one(self, sql: str, params: Sequence[Any]) -> str | None:
        import psycopg

        async with self._io_lock:
            try:
                cur = await self._conn.execute(sql, params)
                row = await cur.fetchone()
            except psycopg.Error as exc:
                raise IdMapUnavailable("the id map database query failed") from exc
        return str(row[0]) if row else None

    async def find_canonical(self, backend: str, kind: str, value: str) -> str | None:
        sql = f"SELECT canonical FROM {self._table} WHERE backend = %s AND kind = %s AND value = %s"  # noqa: S608
        return await self._one(sql, (backend, kind, value))

    async def find_value(self, canonical: str, backend: str, kind: str) -> str | None:
        sql = f"SELECT value FROM {self._table} WHERE canonical = %s AND backend = %s AND kind = %s"  # noqa: S608
        return await self._one(sql, (canonical, backend, kind))

    async def insert(self, canonical: str, backend: str, kind: str, value: str) -> None:
        import psycopg

        sql = f"INSERT INTO {self._table} (canonical, backend, kind, value) VALUES (%s, %s, %s, %s)"  # noqa: S608
        async with self._io_lock:
            try:
                await self._conn.execute(sql, (canonical, backend, kind, value))
            except psycopg.errors.UniqueViolation as exc:
                raise IdMapConflict("a concurrent write mapped this id differently") from exc
            except psycopg.Error as exc:
                raise IdMapUnavailable("the id map database insert failed") from exc

    async def close(self) -> None:
        await self._conn.close()


# -- seeding ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdMapEntry:
    """One seed row. ``backend`` is None for national identifiers."""

    canonical: str
    backend: str | None
    kind: str
    value: str

    def __repr__(self) -> str:
        return f"IdMapEntry(canonical={self.canonical!r}, backend={self.backend!r}, kind={self.kind!r})"


def load_idmap_yaml(path: str | Path) -> list[IdMapEntry]:
    """Read a seed file: a list of ``{canonical, ids: {backend: {kind: value}}}`` (``"*"`` = national).

    Every problem is a ``ConfigError`` whose key names the entry, e.g. ``idmap.seed[2].ids.epic.mrn``.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("idmap.seed", "cannot read the YAML seed file") from exc
    if not isinstance(data, list):
        raise ConfigError("idmap.seed", "must be a YAML list of {canonical, ids}")
    entries: list[IdMapEntry] = []
    for index, item in enumerate(data):
        key = f"idmap.seed[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("ids"), dict):
            raise ConfigError(key, "must be a mapping with 'canonical' and 'ids'")
        canonical = item.get("canonical")
        if not isinstance(canonical, str) or not _CANONICAL.match(canonical):
            raise ConfigError(f"{key}.canonical", "must match the FHIR id grammar [A-Za-z0-9-.]{1,64}")
        for backend, kinds in item["ids"].items():
            if not isinstance(kinds, dict):
                raise ConfigError(f"{key}.ids.{backend}", "must map kinds to values")
            for kind, value in kinds.items():
                try:
                    backend_name = None if str(backend) == ANY_BACKEND else _check_backend(str(backend))
                    _check_kind(str(kind))
                    cleaned = _check_put_value(str(kind), str(value))
                except InvalidArgument as exc:
                    raise ConfigError(f"{key}.ids.{backend}.{kind}", exc.rule) from exc
                entries.append(IdMapEntry(canonical, backend_name, str(kind), cleaned))
    return entries


async def seed_idmap(idmap: IdMap, entries: Sequence[IdMapEntry]) -> int:
    """Put every entry; returns how many are in the map now (identical rows count, an entry that contradicts a
    stored mapping is skipped: the stored one stands, so a seed file never rewrites a live map)."""
    applied = 0
    for entry in entries:
        try:
            await idmap.put(entry.canonical, entry.backend, entry.kind, entry.value)
        except ConfigError:
            continue
        applied += 1
    return applied
