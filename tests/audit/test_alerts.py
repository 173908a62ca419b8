"""The denial-burst detector and the alert emitter, with an injected clock."""

from __future__ import annotations

import logging

import pytest

from mcp_fhir import metrics
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


def test_the_emitter_keeps_policy_alerts_and_a_burst_inside_the_record_itself() -> None:
    emitter = AlertEmitter(DenialBurstDetector(1, 60, clock=Clock()))
    rec = make_record(1, result="denied", alerts=("bulk_access",))
    out = emitter.annotate(rec)
    assert (out.kind, out.request_id, out.alerts) == ("access", "req-1", ("bulk_access", DENIAL_BURST))
    assert out.to_dict() | {"alerts": ["bulk_access"]} == rec.to_dict()


def test_a_record_without_alerts_is_returned_unchanged() -> None:
    emitter = AlertEmitter(DenialBurstDetector(5, 60, clock=Clock()))
    rec = make_record(1, result="denied")
    assert emitter.annotate(rec) is rec


def test_an_alert_record_is_never_annotated_again() -> None:
    emitter = AlertEmitter(DenialBurstDetector(1, 60, clock=Clock()))
    rec = make_record(1, kind="alert", result="denied", alerts=("audit_recovery",))
    assert emitter.annotate(rec) is rec


def test_each_alert_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def count(name: str) -> float:
        return metrics.REGISTRY.get_sample_value("mcp_fhir_alerts_total", {"alert": name}) or 0.0

    before = count("after_hours"), count(DENIAL_BURST)
    emitter = AlertEmitter(DenialBurstDetector(1, 60, clock=Clock()))
    with caplog.at_level(logging.INFO, logger="mcp_fhir.audit.alerts"):
        emitter.annotate(make_record(1, result="denied", alerts=("after_hours",)))
    assert (count("after_hours"), count(DENIAL_BURST)) == (before[0] + 1, before[1] + 1)
    assert sorted(getattr(r, "alert", None) for r in caplog.records) == ["after_hours", DENIAL_BURST]
