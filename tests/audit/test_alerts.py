"""The denial-burst detector and the alert emitter, with an injected clock."""

from __future__ import annotations

from mcp_fhir.audit.alerts import DENIAL_BURST, AlertEmitter, DenialBurstDetector

from .conftest import make_record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_fires_once_when_the_threshold_is_reached_within_the_window() -> None:
    clock = Clock()
    d = DenialBurstDetector(3, 60, clock=clock)
    fired = [d.observe("agent-a") for _ in range(6)]
    assert fired == [False, False, True, False, False, False]


def test_a_burst_can_fire_again_in_the_next_window() -> None:
    clock = Clock()
    d = DenialBurstDetector(2, 60, clock=clock)
    assert [d.observe("a"), d.observe("a")] == [False, True]
    clock.now += 61
    assert [d.observe("a"), d.observe("a")] == [False, True]


def test_denials_spread_wider_than_the_window_do_not_fire() -> None:
    clock = Clock()
    d = DenialBurstDetector(3, 60, clock=clock)
    results = []
    for _ in range(6):
        results.append(d.observe("a"))
        clock.now += 31
    assert not any(results)


def test_agents_are_counted_separately() -> None:
    d = DenialBurstDetector(2, 60, clock=Clock())
    assert [d.observe("a"), d.observe("b"), d.observe("a")] == [False, False, True]


def test_the_emitter_turns_policy_alerts_and_bursts_into_alert_records() -> None:
    emitter = AlertEmitter(DenialBurstDetector(1, 60, clock=Clock()))
    out = emitter.derive(make_record(1, result="denied", alerts=("bulk_access",)))
    assert [r.alerts for r in out] == [("bulk_access",), (DENIAL_BURST,)]
    assert all(r.kind == "alert" and r.request_id == "req-1" for r in out)
    assert emitter.derive(out[0]) == []
