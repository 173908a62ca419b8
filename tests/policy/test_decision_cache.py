"""The optional decision cache (`policy/decide.py`): its key, the policy-given lifetime, the audit record of
a reused decision, and the off switch (nothing changes with it off)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mcp_fhir.audit.fake import FakeAuditTrail
from mcp_fhir.policy.decide import Decider, DecisionCache, cache_key
from mcp_fhir.policy.engine import Decision, FakePolicyEngine, Obligations
from mcp_fhir.policy.input import DecisionInput, utc_now_rfc3339
from tests.tools.conftest import PATIENT, SUBJECT, make_harness, observation

T0 = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)


def _input(at: datetime = T0, request_id: str = "req-1", **changes: Any) -> DecisionInput:
    base = DecisionInput(
        subject=SUBJECT,
        tool="search_observations",
        operation="search",
        resource_type="Observation",
        patient=PATIENT,
        params={"category": "vital-signs"},
        purpose="treatment",
        break_glass_reason=None,
        backend="fake",
        request_id=request_id,
        time=utc_now_rfc3339(at),
    )
    return dataclasses.replace(base, **changes)


def _allow(valid_for_s: int | None = 60, decision_id: str = "d-1") -> Decision:
    return Decision(allow=True, obligations=Obligations(), decision_id=decision_id, valid_for_s=valid_for_s)


def _cached_decider(decide: Any = None, max_entries: int = 100) -> tuple[Decider, FakePolicyEngine]:
    engine = FakePolicyEngine(decide or (lambda _i: _allow()))
    return Decider(engine, audit=FakeAuditTrail().record, cache=DecisionCache(max_entries)), engine


def test_the_key_leaves_out_the_request_id_and_the_time_and_nothing_else():
    one = _input(request_id="a").to_opa()
    other = _input(at=T0 + timedelta(seconds=5), request_id="b").to_opa()
    assert cache_key("rev-1", one) == cache_key("rev-1", other)
    for change in (
        {"patient": "pat-2"},
        {"purpose": "payment"},
        {"params": {"category": "laboratory"}},
        {"break_glass_reason": "emergency"},
        {"tool": "search_conditions"},
        {"subject": dataclasses.replace(SUBJECT, scopes=("other",))},
    ):
        assert cache_key("rev-1", _input(**change).to_opa()) != cache_key("rev-1", one), change


def test_the_key_names_the_bundle_revision():
    opa_input = _input().to_opa()
    assert cache_key("rev-1", opa_input) != cache_key("rev-2", opa_input)


def test_the_key_is_canonical_whatever_the_order_of_the_keys():
    opa_input = _input().to_opa()
    reordered = {k: opa_input[k] for k in reversed(list(opa_input))}
    assert cache_key(None, reordered) == cache_key(None, opa_input)


async def test_a_second_identical_call_within_the_policys_lifetime_is_a_hit_with_the_same_decision_id():
    decider, engine = _cached_decider()
    first = await decider.decide(_input(request_id="a"))
    second = await decider.decide(_input(at=T0 + timedelta(seconds=59), request_id="b"))
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.decision_id == first.decision_id == "d-1"
    assert len(engine.calls) == 1


async def test_the_lifetime_is_the_policys_valid_for_s_from_the_inputs_instant():
    decider, engine = _cached_decider()
    await decider.decide(_input())
    expired = await decider.decide(_input(at=T0 + timedelta(seconds=60)))
    assert expired.cache == "miss"
    assert len(engine.calls) == 2


async def test_an_instant_before_the_cached_decision_is_a_miss():
    decider, engine = _cached_decider()
    await decider.decide(_input())
    assert (await decider.decide(_input(at=T0 - timedelta(seconds=1)))).cache == "miss"
    assert len(engine.calls) == 2


@pytest.mark.parametrize("valid_for_s", [None, 0], ids=["no lifetime", "zero"])
async def test_a_decision_without_a_lifetime_from_the_policy_is_never_reused(valid_for_s: int | None):
    decider, engine = _cached_decider(lambda _i: _allow(valid_for_s=valid_for_s))
    await decider.decide(_input())
    assert (await decider.decide(_input())).cache == "miss"
    assert len(engine.calls) == 2


async def test_a_decision_without_a_decision_id_is_never_reused():
    decider, engine = _cached_decider(lambda _i: _allow(decision_id=""))
    await decider.decide(_input())
    await decider.decide(_input())
    assert len(engine.calls) == 2


async def test_a_failure_is_never_reused():
    calls = []

    def flaky(_i: Any) -> Decision:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return _allow()

    decider, _ = _cached_decider(flaky)
    failed = await decider.decide(_input())
    assert failed.allow is False
    assert (await decider.decide(_input())).allow is True


async def test_a_new_bundle_revision_is_a_miss():
    decider, engine = _cached_decider()
    await decider.decide(_input())
    engine.current_revision = "rev-2"
    assert (await decider.decide(_input())).cache == "miss"
    assert len(engine.calls) == 2


async def test_the_cache_holds_at_most_its_bound():
    decider, _ = _cached_decider(max_entries=2)
    for patient in ("p1", "p2", "p3"):
        await decider.decide(_input(patient=patient))
    assert decider.cache is not None and len(decider.cache) == 2


async def test_with_the_cache_off_every_call_asks_the_engine_and_the_decision_is_unchanged():
    engine = FakePolicyEngine(lambda _i: _allow())
    decider = Decider(engine, audit=FakeAuditTrail().record)
    first = await decider.decide(_input())
    second = await decider.decide(_input())
    assert len(engine.calls) == 2
    assert first == second == _allow()
    assert first.cache is None


async def test_every_call_answered_from_the_cache_writes_its_own_record_naming_the_reused_decision():
    h = make_harness(lambda _i: _allow(decision_id="d-reused"), resources=[observation("o1")])
    h.app.decider.cache = DecisionCache()
    args = {"patient_id": PATIENT, "purpose": "treatment", "category": "laboratory"}
    for _ in range(3):
        await h.run("search_observations", **args)
    records = h.sink.of_kind("access")
    assert [(r.result, r.decision_id, r.extra.get("decision_cache")) for r in records] == [
        ("allowed", "d-reused", "miss"),
        ("allowed", "d-reused", "hit"),
        ("allowed", "d-reused", "hit"),
    ]
    assert len({r.request_id for r in records}) == 3
    assert len(h.engine.calls) == 1


async def test_with_the_cache_off_a_record_says_nothing_about_a_decision_cache():
    h = make_harness(lambda _i: _allow(decision_id="d-1"), resources=[observation("o1")])
    await h.run("search_observations", patient_id=PATIENT, purpose="treatment", category="laboratory")
    (record,) = h.sink.of_kind("access")
    assert "decision_cache" not in record.extra
