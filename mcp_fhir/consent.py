"""Patient consent directives, read for every decision and passed to the policy in a normalised form.

Python decides nothing here: it reads a patient's FHIR R4 `Consent` resources, keeps the active ones,
flattens their provisions, and hands them to OPA as `input.context.consent`. The policy
(`policies/mcp_fhir/authz/consent.rego`) decides what each provision means.

    ConsentSource (Protocol: async directives(patient) -> list[Consent resource])
    ├── EhrConsentSource      the EHR's `Consent?patient=` search, under its own SMART scope
    ├── SqliteConsentStore    the local store (default): stdlib sqlite3, blocking calls in a worker thread
    ├── PostgresConsentStore  the local store when scaled out (psycopg 3 async, schema created on connect)
    └── MemoryConsentStore    in-process fake for unit tests
    ConsentReader             a TTL cache in front of one source, invalidated on write

`ConsentReader.context(patient)` never raises: a source that fails gives
`{"status": "unavailable", "provisions": []}`, and the policy denies with `CONSENT_UNAVAILABLE`
(fail closed, in Rego, where break-glass may be weighed).

The normalised form of one provision (each nested provision becomes an entry of its own; a nested
provision without a period inherits its parent's; the root's type, when absent, follows the consent's
`policyRule`: OPTOUT → deny, OPTIN → permit):

    {"consent": id, "type": "permit" | "deny", "actor": [reference], "actor_roles": [code],
     "action": [code], "purpose": [code], "security_labels": [code], "classes": [resource type],
     "codes": [code], "data": [reference], "period": {"start": RFC 3339 | None, "end": RFC 3339 | None}}

A FHIR date in a period (`2025`, `2025-06`, `2025-06-30`) becomes the first instant of that day, month
or year for `start`, and the last for `end` (UTC), so the policy compares instants only.

Hand-written on purpose: no Python FHIR library normalises Consent provisions for a policy engine
(`fhir.resources` validates the model; it does not flatten or interpret it).
"""

from __future__ import annotations

import asyncio
import calendar
import json
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from mcp_fhir._exceptions import InvalidArgument

__all__ = [
    "ConsentReader",
    "ConsentSource",
    "EhrConsentSource",
    "MemoryConsentStore",
    "PostgresConsentStore",
    "SqliteConsentStore",
    "normalise_consents",
]

UNAVAILABLE: dict[str, Any] = {"status": "unavailable", "provisions": []}
DEFAULT_TTL_SECONDS = 60.0
_BASE_TYPE = {"OPTOUT": "deny", "OPTIN": "permit", "OPTOUTE": "deny", "OPTINR": "permit"}


class ConsentSource(Protocol):
    async def directives(self, patient: str) -> list[dict[str, Any]]: ...


def _codes(concepts: Any) -> list[str]:
    """The codes of a CodeableConcept, a list of them, a Coding or a list of Codings, in order, once each."""
    out: list[str] = []

    def add(code: Any) -> None:
        if isinstance(code, str) and code and code not in out:
            out.append(code)

    items = concepts if isinstance(concepts, list) else [concepts]
    for item in items:
        if not isinstance(item, Mapping):
            continue
        if "coding" in item:
            for coding in item.get("coding") or []:
                if isinstance(coding, Mapping):
                    add(coding.get("code"))
        else:
            add(item.get("code"))
    return out


def _class_type(coding: Any) -> str | None:
    """A provision class names resource types by code (`http://hl7.org/fhir/resource-types#Observation`)."""
    if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
        return str(coding["code"])
    return None


def _instant(value: Any, *, end: bool) -> str | None:
    """A FHIR date or dateTime as an RFC 3339 instant: a date is its first (start) or last (end) instant."""
    if not isinstance(value, str) or not value:
        return None
    if "T" in value:
        return value
    parts = [int(p) for p in value.split("-")]
    year, month, day = [*parts, 0, 0][:3]
    if not end:
        return f"{year:04d}-{max(month, 1):02d}-{max(day, 1):02d}T00:00:00Z"
    month = month or 12
    day = day or calendar.monthrange(year, month)[1]
    return f"{year:04d}-{month:02d}-{day:02d}T23:59:59.999Z"


def _period(raw: Any, inherited: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(raw, Mapping) and (raw.get("start") or raw.get("end")):
        return {"start": _instant(raw.get("start"), end=False), "end": _instant(raw.get("end"), end=True)}
    return dict(inherited)


def _provisions(
    consent_id: str, node: Mapping[str, Any], base_type: str | None, inherited: Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    kind = node.get("type") or base_type
    period = _period(node.get("period"), inherited)
    rule = {
        "consent": consent_id,
        "type": kind if kind in ("permit", "deny") else None,
        "actor": [
            ref
            for a in node.get("actor") or []
            if isinstance(a, Mapping) and isinstance(ref := (a.get("reference") or {}).get("reference"), str)
        ],
        "actor_roles": [
            code for a in node.get("actor") or [] if isinstance(a, Mapping) for code in _codes(a.get("role"))
        ],
        "action": _codes(node.get("action") or []),
        "purpose": _codes(node.get("purpose") or []),
        "security_labels": _codes(node.get("securityLabel") or []),
        "classes": [t for t in (_class_type(c) for c in node.get("class") or []) if t],
        "codes": _codes(node.get("code") or []),
        "data": [
            d["reference"]["reference"]
            for d in node.get("data") or []
            if isinstance(d, Mapping) and isinstance(d.get("reference"), Mapping)
        ],
        "period": period,
    }
    if rule["type"] is not None:
        yield rule
    for child in node.get("provision") or []:
        if isinstance(child, Mapping):
            # A nested provision is an exception to its parent: by default the opposite type.
            opposite = {"permit": "deny", "deny": "permit"}.get(str(kind)) if kind else None
            yield from _provisions(consent_id, child, opposite, period)


def normalise_consents(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every provision of every active Consent, flattened (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for consent in resources:
        if not isinstance(consent, Mapping) or consent.get("resourceType") != "Consent":
            continue
        if consent.get("status") != "active":
            continue
        base = next((_BASE_TYPE[c] for c in _codes(consent.get("policyRule") or {}) if c in _BASE_TYPE), None)
        root = consent.get("provision")
        if isinstance(root, Mapping):
            out.extend(_provisions(str(consent.get("id", "")), root, base, {"start": None, "end": None}))
        elif base is not None:
            # No provision at all: the policy rule alone is the directive, for everything.
            out.extend(_provisions(str(consent.get("id", "")), {}, base, {"start": None, "end": None}))
    return out


def _patient_of(resource: Mapping[str, Any]) -> str:
    ref = (resource.get("patient") or {}).get("reference") if isinstance(resource, Mapping) else None
    if not isinstance(ref, str) or not ref.startswith("Patient/"):
        raise InvalidArgument("consent", "must name its patient as Patient/<id>")
    return ref.removeprefix("Patient/")


def _check_consent(resource: Mapping[str, Any]) -> tuple[str, str]:
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "Consent":
        raise InvalidArgument("consent", "must be a FHIR Consent resource")
    rid = resource.get("id")
    if not isinstance(rid, str) or not rid:
        raise InvalidArgument("consent", "must have an id")
    return rid, _patient_of(resource)


# --- sources ---------------------------------------------------------------------------------------------------


class EhrConsentSource:
    """The EHR's own Consent resources, through the EHR client (cache, limiter, breaker, its SMART scope)."""

    def __init__(self, search: Callable[[str], Awaitable[list[dict[str, Any]]]]) -> None:
        self._search = search  # backend patient id -> Consent resources

    async def directives(self, patient: str) -> list[dict[str, Any]]:
        return await self._search(patient)


class MemoryConsentStore:
    """In-process fake for unit tests."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}

    async def directives(self, patient: str) -> list[dict[str, Any]]:
        return [r for r in self._rows.values() if _patient_of(r) == patient]

    async def put(self, resource: dict[str, Any]) -> str:
        rid, _ = _check_consent(resource)
        self._rows[rid] = dict(resource)
        return _patient_of(resource)

    async def aclose(self) -> None:
        return None


class SqliteConsentStore:
    """The default local store: one table of Consent resources by patient; the file is created 0600."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS consent (id TEXT PRIMARY KEY, patient TEXT NOT NULL, body TEXT NOT NULL)"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS consent_patient ON consent (patient)")

    def _query(self, patient: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT body FROM consent WHERE patient = ? ORDER BY id", (patient,))
            return [json.loads(body) for (body,) in rows.fetchall()]

    def _put(self, rid: str, patient: str, body: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO consent (id, patient, body) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET patient = excluded.patient, body = excluded.body",
                (rid, patient, body),
            )

    async def directives(self, patient: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._query, patient)

    async def put(self, resource: dict[str, Any]) -> str:
        """Store (or replace) one Consent; returns its patient, whose cached directives are now stale."""
        rid, patient = _check_consent(resource)
        await asyncio.to_thread(self._put, rid, patient, json.dumps(resource, separators=(",", ":")))
        return patient

    async def aclose(self) -> None:
        await asyncio.to_thread(self._conn.close)


class PostgresConsentStore:
    """The shared local store when replicas scale out (psycopg 3 async). Build with :meth:`connect`."""

    def __init__(self, conn: Any, table: str) -> None:
        self._conn = conn
        self._table = table
        self._io = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str, *, table: str = "mcp_fhir_consent") -> PostgresConsentStore:
        import psycopg

        if not table.replace("_", "").isalnum():
            raise InvalidArgument("consent.table", "must be a plain identifier")
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, patient TEXT NOT NULL, body JSONB NOT NULL)"
        )
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {table}_patient ON {table} (patient)")
        return cls(conn, table)

    async def directives(self, patient: str) -> list[dict[str, Any]]:
        async with self._io:
            cur = await self._conn.execute(
                f"SELECT body FROM {self._table} WHERE patient = %s ORDER BY id",  # noqa: S608 - checked identifier
                (patient,),
            )
            rows = await cur.fetchall()
        return [r[0] if isinstance(r[0], dict) else json.loads(r[0]) for r in rows]

    async def put(self, resource: dict[str, Any]) -> str:
        rid, patient = _check_consent(resource)
        async with self._io:
            await self._conn.execute(
                f"INSERT INTO {self._table} (id, patient, body) VALUES (%s, %s, %s) "  # noqa: S608
                "ON CONFLICT (id) DO UPDATE SET patient = EXCLUDED.patient, body = EXCLUDED.body",
                (rid, patient, json.dumps(resource)),
            )
        return patient

    async def aclose(self) -> None:
        await self._conn.close()


# --- the reader the decide step uses -------------------------------------------------------------------------


class ConsentReader:
    """A patient's normalised directives, cached for `ttl_seconds`, invalidated on write. Never raises."""

    def __init__(
        self,
        source: ConsentSource,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}

    async def context(self, patient: str | None) -> dict[str, Any] | None:
        """`input.context.consent` for a call about `patient` (None when the call names no patient)."""
        if patient is None:
            return None
        now = self._clock()
        hit = self._cache.get(patient)
        if hit is not None and now - hit[0] < self.ttl_seconds:
            return hit[1]
        try:
            resources = await self.source.directives(patient)
            value = {"status": "ok", "provisions": normalise_consents(resources)}
        except Exception:  # any failure to read consent is the policy's to judge: fail closed there
            return dict(UNAVAILABLE)
        self._cache[patient] = (now, value)
        return value

    def invalidate(self, patient: str) -> None:
        """A Consent for `patient` was written: the next decision reads it afresh."""
        self._cache.pop(patient, None)
