from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_fhir import metrics
from mcp_fhir._exceptions import ConfigError
from mcp_fhir.resilience.cache import (
    DEFAULT_STALE_RETENTION_SECONDS,
    DEFAULT_TTL_SECONDS_BY_TYPE,
    Cache,
    CacheEntry,
    CacheKey,
    CacheSettings,
    MemoryStore,
    canonical_query,
)


def _count(backend: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "mcp_fhir_cache_total", {"backend": backend, "outcome": outcome}
    )
    return value or 0.0


def test_canonical_query_is_independent_of_parameter_and_value_order():
    a = canonical_query({"code": ["b", "a"], "category": "laboratory", "_count": 50})
    b = canonical_query([("_count", "50"), ("category", "laboratory"), ("code", "a"), ("code", "b")])
    assert a == b
    assert canonical_query(None) == ""


def test_cache_key_digest_and_repr_hold_no_patient_id_or_query():
    key = CacheKey.build("epic", "pat-SECRET-123", "Observation", {"code": "hba1c-secret"})
    assert len(key.digest) == 64
    assert "SECRET" not in key.digest and "SECRET" not in key.scope
    assert "SECRET" not in repr(key) and "secret" not in repr(key)


def test_a_patient_id_of_none_differs_from_the_string_none():
    assert CacheKey.build("b", None, "Patient").digest != CacheKey.build("b", "None", "Patient").digest
    assert CacheKey.build("b", None, "Patient").scope != CacheKey.build("b", "null", "Patient").scope


def test_entry_is_fresh_within_ttl_and_stale_after():
    entry = CacheEntry({"a": 1}, stored_at=100.0, ttl=10.0)
    assert entry.fresh(109.9)
    assert not entry.fresh(110.0)
    assert entry.age(105.0) == 5.0
    assert entry.age(50.0) == 0.0


async def test_put_then_lookup_counts_hit_then_stale_then_miss_after_retention(clock):
    settings = CacheSettings(ttl_seconds={"Observation": 300.0}, stale_retention_seconds=600.0)
    cache = Cache(settings, clock=clock)
    key = CacheKey.build("oracle", "p1", "Observation", {"category": "vital-signs"})
    before = {o: _count("oracle", o) for o in ("hit", "stale", "miss")}

    assert (await cache.lookup(key)).outcome == "miss"
    await cache.put(key, {"resourceType": "Bundle", "total": 1})
    found = await cache.lookup(key)
    assert found.outcome == "hit" and found.entry is not None
    assert found.entry.value == {"resourceType": "Bundle", "total": 1}

    clock.advance(301)
    stale = await cache.lookup(key)
    assert stale.outcome == "stale" and stale.entry is not None and not stale.entry.fresh(cache.now())

    clock.advance(600)
    assert (await cache.lookup(key)).outcome == "miss"
    after = {o: _count("oracle", o) for o in ("hit", "stale", "miss")}
    assert after == {"hit": before["hit"] + 1, "stale": before["stale"] + 1, "miss": before["miss"] + 2}


async def test_get_returns_a_copy_so_callers_cannot_change_the_cache(clock):
    cache = Cache(clock=clock)
    key = CacheKey.build("b", "p", "Patient")
    await cache.put(key, {"name": [{"family": "A"}]})
    got = await cache.get(key)
    assert got is not None
    got.value["name"][0]["family"] = "changed"
    again = await cache.get(key)
    assert again is not None and again.value == {"name": [{"family": "A"}]}


async def test_ttl_depends_on_resource_type(clock):
    cache = Cache(clock=clock)
    patient = await cache.put(CacheKey.build("b", "p", "Patient"), {})
    obs = await cache.put(CacheKey.build("b", "p", "Observation"), {})
    unknown = await cache.put(CacheKey.build("b", "p", "Flag"), {})
    assert patient.ttl == DEFAULT_TTL_SECONDS_BY_TYPE["Patient"] == 1800
    assert obs.ttl == DEFAULT_TTL_SECONDS_BY_TYPE["Observation"] == 300
    assert unknown.ttl == CacheSettings().default_ttl_seconds
    assert CacheSettings().stale_retention_seconds == DEFAULT_STALE_RETENTION_SECONDS == 86400


async def test_invalidate_patient_drops_only_the_named_types_of_that_patient(clock):
    cache = Cache(clock=clock)
    obs = CacheKey.build("epic", "p1", "Observation", {"code": "x"})
    meds = CacheKey.build("epic", "p1", "MedicationStatement")
    other_patient = CacheKey.build("epic", "p2", "Observation", {"code": "x"})
    other_backend = CacheKey.build("cerner", "p1", "Observation", {"code": "x"})
    for key in (obs, meds, other_patient, other_backend):
        await cache.put(key, {"k": key.digest})

    assert await cache.invalidate_patient("epic", "p1", ["Observation"]) == 1
    assert await cache.get(obs) is None
    assert await cache.get(meds) is not None
    assert await cache.get(other_patient) is not None
    assert await cache.get(other_backend) is not None

    assert await cache.invalidate_patient("epic", "p1") == 1
    assert await cache.get(meds) is None
    assert await cache.get(other_backend) is not None


async def test_memory_store_evicts_least_recently_used_by_entry_count(clock):
    store = MemoryStore(max_entries=2, clock=clock)
    cache = Cache(store=store, clock=clock)
    a, b, c = (CacheKey.build("b", "p", "Patient", {"n": str(i)}) for i in range(3))
    await cache.put(a, {"v": "a"})
    await cache.put(b, {"v": "b"})
    assert await cache.get(a) is not None  # a is now the most recently used
    await cache.put(c, {"v": "c"})
    assert await cache.get(b) is None
    assert await cache.get(a) is not None and await cache.get(c) is not None
    assert store.size[0] == 2


async def test_memory_store_evicts_to_stay_under_its_byte_budget(clock):
    store = MemoryStore(max_entries=100, max_bytes=2048, clock=clock)
    cache = Cache(store=store, clock=clock)
    blob = {"text": "x" * 900}
    size = len(json.dumps(blob, separators=(",", ":")))
    keys = [CacheKey.build("b", "p", "Observation", {"n": str(i)}) for i in range(3)]
    for key in keys:
        await cache.put(key, blob)
    assert store.size == (2, 2 * size)
    assert await cache.get(keys[0]) is None
    await cache.put(CacheKey.build("b", "p", "Observation", {"n": "big"}), {"text": "x" * 5000})
    assert store.size == (2, 2 * size)


async def test_invalidation_index_does_not_hold_evicted_entries(clock):
    store = MemoryStore(max_entries=1, clock=clock)
    cache = Cache(store=store, clock=clock)
    await cache.put(CacheKey.build("b", "p1", "Observation"), {})
    await cache.put(CacheKey.build("b", "p2", "Observation"), {})
    assert await cache.invalidate_patient("b", "p1") == 0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"ttl_seconds": {"Observation": 0.5}}, "cache.ttl_seconds.Observation"),
        ({"ttl_seconds": {"Patient": 90_000}}, "cache.ttl_seconds.Patient"),
        ({"ttl_seconds": {"Patient": "600"}}, "cache.ttl_seconds.Patient"),
        ({"default_ttl_seconds": float("nan")}, "cache.default_ttl_seconds"),
        ({"stale_retention_seconds": -1}, "cache.stale_retention_seconds"),
        ({"max_entries": 0}, "cache.max_entries"),
        ({"max_bytes": 10}, "cache.max_bytes"),
        ({"backend": "memcached"}, "cache.backend"),
        ({"backend": "redis"}, "cache.redis_url_env"),
    ],
)
def test_invalid_cache_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        CacheSettings(**kwargs)
    assert info.value.code == "config_invalid"
    assert info.value.key == key


def test_redis_cache_with_unset_url_variable_is_a_config_error():
    settings = CacheSettings(backend="redis", redis_url_env="MCP_FHIR_TEST_UNSET_VARIABLE")
    with pytest.raises(ConfigError) as info:
        Cache.from_settings(settings, environ={})
    assert info.value.key == "cache.redis_url_env"


_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_key_parts = st.tuples(
    _names,
    st.none() | _names,
    st.sampled_from(["Patient", "Observation", "MedicationStatement", "Condition"]),
    st.dictionaries(_names, _names, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(a=_key_parts, b=_key_parts)
def test_different_backend_patient_type_or_query_never_share_a_key(a, b):
    key_a, key_b = CacheKey.build(*a), CacheKey.build(*b)
    same_parts = (key_a.backend, key_a.patient, key_a.resource_type, key_a.query) == (
        key_b.backend,
        key_b.patient,
        key_b.resource_type,
        key_b.query,
    )
    assert (key_a.digest == key_b.digest) == same_parts
    same_scope = (key_a.backend, key_a.patient) == (key_b.backend, key_b.patient)
    assert (key_a.scope == key_b.scope) == same_scope


@settings(max_examples=100, deadline=None)
@given(
    entries=st.lists(_key_parts, min_size=1, max_size=12),
    victim=st.tuples(_names, st.none() | _names),
    types=st.none() | st.sets(st.sampled_from(["Patient", "Observation", "Condition"])),
)
async def test_invalidating_one_patient_never_removes_another_patients_entries(entries, victim, types):
    cache = Cache(clock=lambda: 1_000.0)
    keys = [CacheKey.build(*parts) for parts in entries]
    for key in keys:
        await cache.put(key, {"digest": key.digest})
    await cache.invalidate_patient(victim[0], victim[1], types)
    for key in keys:
        removed = (key.backend, key.patient) == victim and (types is None or key.resource_type in types)
        got = await cache.get(key)
        assert (got is None) == removed
        if got is not None:
            assert got.value == {"digest": key.digest}
