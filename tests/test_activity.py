"""Issue #21 (3): per-subject sliding-window counters for the policy's anomaly rules, in memory or shared
by replicas through Redis. The policy decides; these tests pin the counts it is given."""

from __future__ import annotations

import uuid

import pytest

from mcp_fhir.activity import MemoryActivity, RedisActivity


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def drive(counters, clock: Clock, subject: str, patients: int):
    snap = None
    for i in range(patients):
        clock.now += 1
        snap = await counters.observe(subject, f"pat-{i}")
    return snap


async def test_the_call_being_decided_is_in_its_own_snapshot():
    counters = MemoryActivity((60, 600), clock=Clock())
    snap = await counters.observe("agent-a", "pat-1")
    assert snap == {
        "60": {"calls": 1, "distinct_patients": 1, "denials": 0},
        "600": {"calls": 1, "distinct_patients": 1, "denials": 0},
    }


async def test_distinct_patients_calls_and_denials_are_counted_per_window_and_per_subject():
    clock = Clock()
    counters = MemoryActivity((60, 600), clock=clock)
    await drive(counters, clock, "agent-a", 25)  # 25 patients over 25 s
    await counters.observe("agent-a", "pat-0")  # a patient seen before is not a new one
    for _ in range(3):
        await counters.denied("agent-a")
    snap = await counters.observe("agent-b", "pat-0")
    assert snap["600"] == {"calls": 1, "distinct_patients": 1, "denials": 0}
    clock.now += 1
    snap = await counters.observe("agent-a", None)
    assert snap["600"] == {"calls": 27, "distinct_patients": 25, "denials": 3}


async def test_what_falls_out_of_a_window_is_no_longer_counted():
    clock = Clock()
    counters = MemoryActivity((60, 600), clock=clock)
    await drive(counters, clock, "agent-a", 5)
    await counters.denied("agent-a")
    clock.now += 120
    snap = await counters.observe("agent-a", "pat-x")
    assert snap["60"] == {"calls": 1, "distinct_patients": 1, "denials": 0}
    assert snap["600"]["calls"] == 6 and snap["600"]["denials"] == 1


def test_windows_must_be_positive():
    with pytest.raises(ValueError):
        MemoryActivity((0,))


@pytest.mark.redis
async def test_two_replicas_sharing_redis_see_one_subjects_activity_together(redis_url: str):
    import redis.asyncio as redis

    client_a, client_b = redis.from_url(redis_url), redis.from_url(redis_url)
    prefix = f"test-activity-{uuid.uuid4().hex}"
    clock = Clock()
    a = RedisActivity(client_a, (60, 600), prefix=prefix, key=b"k", clock=clock)
    b = RedisActivity(client_b, (60, 600), prefix=prefix, key=b"k", clock=clock)
    try:
        for i in range(12):
            clock.now += 1
            await (a if i % 2 else b).observe("agent-a", f"pat-{i}")
        await a.denied("agent-a")
        clock.now += 1
        snap = await b.observe("agent-a", "pat-0")
        assert snap["600"] == {"calls": 13, "distinct_patients": 12, "denials": 1}
        clock.now += 601
        assert (await a.observe("agent-a", None))["600"] == {"calls": 1, "distinct_patients": 0, "denials": 0}
    finally:
        await client_a.aclose()
        await client_b.aclose()


async def test_memory_holds_only_what_the_longest_window_still_counts():
    clock = Clock()
    counters = MemoryActivity((60, 600), clock=clock)
    await drive(counters, clock, "agent-a", 100)
    clock.now += 601
    await counters.observe("agent-a", "pat-x")
    assert [len(w.calls) for w in counters._subjects["agent-a"]] == [1, 1]
