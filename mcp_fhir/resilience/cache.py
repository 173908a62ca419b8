"""The read cache in front of the EHR: per backend, per patient, per resource type, per query.

* A :class:`CacheKey` is (backend, canonical patient id or ``None``, resource type, canonical
  query). Its storage name is a SHA-256 digest, so no PHI ever appears in a Redis key; an
  index per (backend, patient) — itself named by a digest — lets a write invalidate that
  patient's entries of the affected resource types.
* A :class:`CacheEntry` is fresh for its TTL and then kept for ``stale_retention_seconds``
  more, so a caller may serve it stale when the EHR is down. :meth:`Cache.get` returns fresh
  or stale entries and the caller decides; :meth:`Cache.lookup` is the helper that also counts
  ``metrics.CACHE_EVENTS`` (hit, miss, stale). Use one or the other, not both, per lookup.
* Stores: :class:`MemoryStore` (bounded by entries and bytes, LRU) and :class:`RedisStore`
  (shared between replicas; JSON values; ``PX`` expiry of TTL + stale retention; a Redis SET
  per (backend, patient) as the invalidation index, cleared atomically by a Lua script).

Failure handling: a store that cannot be read or written degrades to a miss / no-op (the EHR
is still asked); a failed *invalidation* raises :class:`UpstreamUnavailable`, because serving
data that a write has just changed would be wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from mcp_fhir import metrics
from mcp_fhir._exceptions import ConfigError, UpstreamUnavailable
from mcp_fhir.resilience.stores import redis_from_env

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_REDIS_KEY_PREFIX",
    "DEFAULT_STALE_RETENTION_SECONDS",
    "DEFAULT_TTL_SECONDS",
    "DEFAULT_TTL_SECONDS_BY_TYPE",
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "Cache",
    "CacheEntry",
    "CacheKey",
    "CacheLookup",
    "CacheSettings",
    "CacheStore",
    "MemoryStore",
    "RedisStore",
    "canonical_query",
]

log = logging.getLogger(__name__)

MIN_TTL_SECONDS = 1.0
MAX_TTL_SECONDS = 24 * 3600.0
DEFAULT_TTL_SECONDS = 5 * 60.0
DEFAULT_TTL_SECONDS_BY_TYPE: Mapping[str, float] = MappingProxyType(
    {
        "Patient": 30 * 60.0,
        "AllergyIntolerance": 30 * 60.0,
        "Condition": 15 * 60.0,
        "Immunization": 30 * 60.0,
        "Procedure": 15 * 60.0,
        "MedicationStatement": 10 * 60.0,
        "MedicationRequest": 10 * 60.0,
        "Encounter": 10 * 60.0,
        "DocumentReference": 10 * 60.0,
        "DiagnosticReport": 5 * 60.0,
        "Observation": 5 * 60.0,
    }
)
DEFAULT_STALE_RETENTION_SECONDS = 24 * 3600.0
MAX_STALE_RETENTION_SECONDS = 7 * 24 * 3600.0
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_REDIS_KEY_PREFIX = "mcpfhir:cache:"

QueryParams = Mapping[str, "str | int | float | Sequence[str | int | float]"] | Iterable[tuple[str, Any]]


def canonical_query(params: QueryParams | None) -> str:
    """A stable string for a FHIR search: parameters and repeated values sorted, then URL-encoded.

    Repeated FHIR parameters are ANDed, so their order carries no meaning and is sorted too.
    """
    if params is None:
        return ""
    pairs: list[tuple[str, str]] = []
    items = params.items() if isinstance(params, Mapping) else params
    for name, value in items:
        if isinstance(value, str | int | float):
            pairs.append((str(name), str(value)))
        else:
            pairs.extend((str(name), str(v)) for v in value)
    return urlencode(sorted(pairs))


def _digest(*parts: str | None) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Identifies one cached EHR answer. Its ``repr`` shows no patient id and no query."""

    backend: str
    patient: str | None
    resource_type: str
    query: str

    @classmethod
    def build(
        cls, backend: str, patient: str | None, resource_type: str, params: QueryParams | None = None
    ) -> CacheKey:
        return cls(backend, patient, resource_type, canonical_query(params))

    @property
    def digest(self) -> str:
        """The storage name: SHA-256 over an injective JSON encoding of all four parts."""
        return _digest(self.backend, self.patient, self.resource_type, self.query)

    @property
    def scope(self) -> str:
        """The name of the (backend, patient) invalidation index."""
        return _scope(self.backend, self.patient)

    def __repr__(self) -> str:
        return (
            f"CacheKey(backend={self.backend!r}, resource_type={self.resource_type!r}, "
            f"digest={self.digest[:12]})"
        )


def _scope(backend: str, patient: str | None) -> str:
    return _digest("scope", backend, patient)


@dataclass(frozen=True)
class CacheEntry:
    """A cached answer, fresh for ``ttl`` seconds after ``stored_at`` (wall-clock seconds)."""

    value: dict[str, Any] = field(repr=False)
    stored_at: float
    ttl: float

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.ttl


@dataclass(frozen=True)
class CacheLookup:
    """What :meth:`Cache.lookup` found: ``outcome`` is ``hit``, ``stale`` or ``miss``."""

    outcome: Literal["hit", "stale", "miss"]
    entry: CacheEntry | None


@dataclass(frozen=True)
class CacheSettings:
    """The ``cache`` section of the configuration; validated on construction."""

    backend: Literal["memory", "redis"] = "memory"
    ttl_seconds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TTL_SECONDS_BY_TYPE))
    default_ttl_seconds: float = DEFAULT_TTL_SECONDS
    stale_retention_seconds: float = DEFAULT_STALE_RETENTION_SECONDS
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    redis_url_env: str | None = None
    redis_key_prefix: str = DEFAULT_REDIS_KEY_PREFIX

    def __post_init__(self) -> None:
        if self.backend not in ("memory", "redis"):
            raise ConfigError("cache.backend", "must be 'memory' or 'redis'")
        for rtype, ttl in self.ttl_seconds.items():
            _check_ttl(f"cache.ttl_seconds.{rtype}", ttl)
        _check_ttl("cache.default_ttl_seconds", self.default_ttl_seconds)
        if not _is_number(self.stale_retention_seconds) or not (
            0 <= self.stale_retention_seconds <= MAX_STALE_RETENTION_SECONDS
        ):
            raise ConfigError(
                "cache.stale_retention_seconds",
                f"must be between 0 and {MAX_STALE_RETENTION_SECONDS:g} seconds",
            )
        if (
            isinstance(self.max_entries, bool)
            or not isinstance(self.max_entries, int)
            or self.max_entries < 1
        ):
            raise ConfigError("cache.max_entries", "must be a positive integer")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1024:
            raise ConfigError("cache.max_bytes", "must be an integer of at least 1024")
        if self.backend == "redis" and not self.redis_url_env:
            raise ConfigError("cache.redis_url_env", "is required when cache.backend is 'redis'")
        if not self.redis_key_prefix:
            raise ConfigError("cache.redis_key_prefix", "must not be empty")

    def ttl_for(self, resource_type: str) -> float:
        return float(self.ttl_seconds.get(resource_type, self.default_ttl_seconds))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


def _check_ttl(key: str, ttl: object) -> None:
    if not _is_number(ttl) or not (MIN_TTL_SECONDS <= ttl <= MAX_TTL_SECONDS):  # type: ignore[operator]
        raise ConfigError(key, f"must be between {MIN_TTL_SECONDS:g} and {MAX_TTL_SECONDS:g} seconds")


class CacheStore(Protocol):
    """Where entries live. Digests and scopes are opaque hex strings; values are JSON-able dicts."""

    async def get(self, key: CacheKey) -> CacheEntry | None: ...

    async def put(self, key: CacheKey, entry: CacheEntry, retention: float) -> None: ...

    async def invalidate(self, scope: str, resource_types: frozenset[str] | None) -> int: ...

    async def aclose(self) -> None: ...


@dataclass
class _Slot:
    blob: bytes
    stored_at: float
    ttl: float
    expires_at: float
    scope: str
    resource_type: str


class MemoryStore:
    """An in-process LRU bounded by ``max_entries`` and ``max_bytes`` (of serialised JSON).

    Values are stored serialised, so a caller that mutates what it got back cannot change the
    cache. An entry larger than ``max_bytes`` is not stored.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._index: dict[str, dict[str, set[str]]] = {}
        self._bytes = 0

    @property
    def size(self) -> tuple[int, int]:
        """(entries, bytes) currently held."""
        return len(self._slots), self._bytes

    async def get(self, key: CacheKey) -> CacheEntry | None:
        digest = key.digest
        slot = self._slots.get(digest)
        if slot is None:
            return None
        if self._clock() >= slot.expires_at:
            self._drop(digest)
            return None
        self._slots.move_to_end(digest)
        return CacheEntry(json.loads(slot.blob), slot.stored_at, slot.ttl)

    async def put(self, key: CacheKey, entry: CacheEntry, retention: float) -> None:
        blob = json.dumps(entry.value, separators=(",", ":")).encode()
        digest = key.digest
        self._drop(digest)
        if len(blob) > self._max_bytes:
            return
        slot = _Slot(blob, entry.stored_at, entry.ttl, entry.stored_at + entry.ttl + retention, key.scope,
                     key.resource_type)  # fmt: skip
        self._slots[digest] = slot
        self._bytes += len(blob)
        self._index.setdefault(slot.scope, {}).setdefault(slot.resource_type, set()).add(digest)
        while len(self._slots) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._slots)))

    async def invalidate(self, scope: str, resource_types: frozenset[str] | None) -> int:
        by_type = self._index.get(scope, {})
        types = list(by_type) if resource_types is None else [t for t in resource_types if t in by_type]
        digests = [d for t in types for d in by_type.get(t, ())]
        for digest in digests:
            self._drop(digest)
        return len(digests)

    async def aclose(self) -> None:
        self._slots.clear()
        self._index.clear()
        self._bytes = 0

    def _drop(self, digest: str) -> None:
        slot = self._slots.pop(digest, None)
        if slot is None:
            return
        self._bytes -= len(slot.blob)
        by_type = self._index.get(slot.scope)
        if by_type is None:
            return
        members = by_type.get(slot.resource_type)
        if members is not None:
            members.discard(digest)
            if not members:
                del by_type[slot.resource_type]
        if not by_type:
            del self._index[slot.scope]


# Deletes the entries named in a scope's index whose resource type is listed (or all when no
# type is listed), removes them from the index, and returns how many were named.
_INVALIDATE_LUA = """
local members = redis.call('SMEMBERS', KEYS[1])
local prefix = ARGV[1]
local wanted = {}
local all = (#ARGV == 1)
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local n = 0
for _, m in ipairs(members) do
  local sep = string.find(m, '|', 1, true)
  local rtype = string.sub(m, 1, sep - 1)
  if all or wanted[rtype] then
    redis.call('DEL', prefix .. 'e:' .. string.sub(m, sep + 1))
    redis.call('SREM', KEYS[1], m)
    n = n + 1
  end
end
return n
"""


class RedisStore:
    """Entries shared by every replica through Redis.

    Keys: ``<prefix>e:<digest>`` holds ``{"v": value, "s": stored_at, "t": ttl}`` with ``PX`` =
    TTL + retention; ``<prefix>i:<scope>`` is a SET of ``<ResourceType>|<digest>`` (resource
    types are not PHI) that expires with the longest entry it names.
    """

    def __init__(self, client: Any, *, prefix: str = DEFAULT_REDIS_KEY_PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._invalidate = client.register_script(_INVALIDATE_LUA)

    async def get(self, key: CacheKey) -> CacheEntry | None:
        from redis.exceptions import RedisError

        try:
            raw = await self._redis.get(f"{self._prefix}e:{key.digest}")
        except RedisError as exc:
            log.warning("cache read failed, treating as a miss (%s)", type(exc).__name__)
            return None
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return CacheEntry(doc["v"], float(doc["s"]), float(doc["t"]))
        except (ValueError, KeyError, TypeError):
            log.warning("cache entry undecodable, treating as a miss")
            return None

    async def put(self, key: CacheKey, entry: CacheEntry, retention: float) -> None:
        from redis.exceptions import RedisError

        blob = json.dumps({"v": entry.value, "s": entry.stored_at, "t": entry.ttl}, separators=(",", ":"))
        px = max(1, int((entry.ttl + retention) * 1000))
        index = f"{self._prefix}i:{key.scope}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(f"{self._prefix}e:{key.digest}", blob, px=px)
                pipe.sadd(index, f"{key.resource_type}|{key.digest}")
                pipe.pexpire(index, px, gt=True)
                pipe.pexpire(index, px, nx=True)
                await pipe.execute()
        except RedisError as exc:
            log.warning("cache write failed, entry not cached (%s)", type(exc).__name__)

    async def invalidate(self, scope: str, resource_types: frozenset[str] | None) -> int:
        from redis.exceptions import RedisError

        try:
            args = [self._prefix, *sorted(resource_types or ())]
            if resource_types is not None and not resource_types:
                return 0
            return int(await self._invalidate(keys=[f"{self._prefix}i:{scope}"], args=args))
        except RedisError as exc:
            raise UpstreamUnavailable("cache invalidation failed", store="redis") from exc

    async def aclose(self) -> None:
        await self._redis.aclose()


class Cache:
    """The read cache: ``get``/``lookup`` then ``put``; ``invalidate_patient`` after writes."""

    def __init__(
        self,
        settings: CacheSettings | None = None,
        store: CacheStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or CacheSettings()
        self._clock = clock
        self._store: CacheStore = store or MemoryStore(
            max_entries=self.settings.max_entries, max_bytes=self.settings.max_bytes, clock=clock
        )

    @classmethod
    def from_settings(
        cls,
        settings: CacheSettings,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Cache:
        """Build the store the settings name (Redis URL read from ``settings.redis_url_env``)."""
        if settings.backend == "redis":
            client = redis_from_env(settings.redis_url_env, "cache.redis_url_env", environ=environ)
            return cls(settings, RedisStore(client, prefix=settings.redis_key_prefix), clock=clock)
        return cls(settings, clock=clock)

    def now(self) -> float:
        return self._clock()

    async def get(self, key: CacheKey) -> CacheEntry | None:
        """The entry, fresh or stale (check ``entry.fresh(cache.now())``), or ``None``. Counts nothing."""
        entry = await self._store.get(key)
        if entry is None:
            return None
        if entry.age(self._clock()) >= entry.ttl + self.settings.stale_retention_seconds:
            return None
        return entry

    async def lookup(self, key: CacheKey) -> CacheLookup:
        """Like :meth:`get`, and counts ``metrics.CACHE_EVENTS`` (hit, stale or miss) for the backend."""
        entry = await self.get(key)
        if entry is None:
            outcome: Literal["hit", "stale", "miss"] = "miss"
        elif entry.fresh(self._clock()):
            outcome = "hit"
        else:
            outcome = "stale"
        metrics.CACHE_EVENTS.labels(key.backend, outcome).inc()
        return CacheLookup(outcome, entry)

    async def put(self, key: CacheKey, value: dict[str, Any]) -> CacheEntry:
        entry = CacheEntry(value, self._clock(), self.settings.ttl_for(key.resource_type))
        await self._store.put(key, entry, self.settings.stale_retention_seconds)
        return entry

    async def invalidate_patient(
        self, backend: str, patient: str | None, resource_types: Iterable[str] | None = None
    ) -> int:
        """Drop the (backend, patient) entries of ``resource_types`` (all types when ``None``).

        Returns how many index entries were removed (some may already have expired).
        """
        types = None if resource_types is None else frozenset(resource_types)
        return await self._store.invalidate(_scope(backend, patient), types)

    async def aclose(self) -> None:
        await self._store.aclose()
