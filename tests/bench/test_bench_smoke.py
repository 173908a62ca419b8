"""The harness's pure parts: percentile maths, ratio calculation, baseline comparison, profile layers."""

from __future__ import annotations

import math
import os
import time

import pytest

from bench.load import CellSamples
from bench.procs import cpu_seconds
from bench.profile import layer_of
from bench.profile import summarise as summarise_profile
from bench.run import lowest_ratios, parse_args
from bench.stats import (
    BenchError,
    compare_to_baseline,
    guard_verdict,
    median_ratios,
    percentile,
    ratios,
    summarise,
    target_report,
)


def test_percentile_interpolates_between_closest_ranks():
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 4.0
    assert percentile(samples, 50) == pytest.approx(2.5)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(BenchError):
        percentile([], 50)
    with pytest.raises(BenchError):
        percentile([1.0], 101)


def test_summarise_reports_milliseconds_and_calls_per_second():
    cell = summarise([0.001] * 99 + [0.011], errors=2, seconds=2.0)
    assert cell.calls == 100
    assert cell.errors == 2
    assert cell.p50_ms == pytest.approx(1.0)
    assert cell.p99_ms == pytest.approx(1.1)
    assert cell.throughput == pytest.approx(50.0)


def test_a_cell_without_successful_calls_has_no_latency_and_zero_throughput():
    cell = summarise([], errors=5, seconds=1.0)
    assert math.isnan(cell.p50_ms)
    assert cell.throughput == 0.0


def test_ratios_divide_by_the_sum_of_their_denominator_cells():
    p50 = {
        "a_opa_bare": {1: 1.0, 8: 2.0},
        "b_decision_inproc": {1: 1.2, 8: 3.0},
        "c_fhir_bare": {1: 3.0},
        "d_sidecar_nocache": {1: 6.0, 8: 10.0},
        "e_sidecar_cache": {1: 2.0},
    }
    got = ratios(p50)
    assert got["b/a"] == {1: pytest.approx(1.2), 8: pytest.approx(1.5)}
    assert got["d/(a+c)"] == {1: pytest.approx(1.5)}  # c=8 has no FHIR figure, so no ratio
    assert got["e/d"] == {1: pytest.approx(1 / 3)}
    assert "d/f" not in got  # no peer measured


def test_a_missing_or_nan_cell_leaves_the_ratio_out():
    assert ratios({"a_opa_bare": {1: math.nan}, "b_decision_inproc": {1: 1.0}}) == {}


def test_a_ratio_that_grew_more_than_a_quarter_is_a_regression():
    baseline = {"b/a": {"1": 1.0, "8": 1.0}, "e/d": {"1": 0.4}}
    current = {"b/a": {"1": 1.26, "8": 1.24}, "e/d": {"1": 0.3}}
    [regression] = compare_to_baseline(current, baseline)
    assert (regression.ratio, regression.concurrency) == ("b/a", 1)
    assert regression.growth == pytest.approx(0.26)


def test_an_improved_or_unmeasured_ratio_is_not_a_regression():
    baseline = {"d/f": {"1": 1.0}, "e/d": {"1": 0.5}}
    assert compare_to_baseline({"e/d": {1: 0.1}}, baseline) == []


def test_the_tolerance_must_be_a_sensible_fraction():
    with pytest.raises(BenchError):
        compare_to_baseline({}, {}, tolerance=0)


def test_target_report_marks_each_target_met_missed_or_unmeasured():
    rows = {name: (value, met) for name, value, _t, met in target_report({"b/a": {1: 1.2}, "e/d": {1: 0.9}})}
    assert rows["b/a"] == (1.2, True)
    assert rows["e/d"] == (0.9, False)
    assert rows["d/f"] == (None, None)


def test_profile_samples_are_charged_to_the_innermost_known_layer():
    audit = "main (x.py:1);record (mcp_fhir/audit/sinks/file.py:10);dumps (json/__init__.py:5)"
    framing = "main (x.py:1);handle (mcp/server/lowlevel.py:3);validate (pydantic/main.py:7)"
    assert layer_of(audit) == "audit"
    assert layer_of(framing) == "validation/serialisation"
    assert layer_of("main (x.py:1)") == "other"
    wrapped = (
        "call (mcp_fhir/agent_auth/http.py:9);read (mcp_fhir/ehr/transport.py:4);feed (aiohttp/parser.py:2)"
    )
    assert layer_of(wrapped) == "FHIR"  # the auth middleware wraps everything; the EHR read is the step
    assert layer_of("run (asyncio/events.py:1);data_received (aiohttp/client_proto.py:3)") == (
        "HTTP client I/O (aiohttp)"
    )
    assert (
        layer_of("call (asyncio/events.py:1);run (mcp_fhir/audit/trail.py:2);dumps (json/encoder.py:5)")
        == "audit"
    )
    shares = summarise_profile([f"{audit} 3", f"{framing} 1", "garbage"])
    assert shares == {"audit": 0.75, "validation/serialisation": 0.25}


def test_median_ratios_take_each_ratios_median_over_the_rounds_that_measured_it():
    rounds = [
        {"b/a": {1: 0.5}, "e/d": {1: 0.9}},
        {"b/a": {1: 3.0}},  # one noisy round moves the mean, not the median
        {"b/a": {1: 0.6}, "e/d": {1: 0.7}},
    ]
    assert median_ratios(rounds) == {"b/a": {1: 0.6}, "e/d": {1: pytest.approx(0.8)}}
    assert median_ratios([]) == {}


def test_cell_samples_summarise_like_the_cell_they_came_from():
    samples = CellSamples([0.002, 0.004], errors=1, seconds=0.5)
    assert samples.summary() == summarise([0.002, 0.004], errors=1, seconds=0.5)


def test_cpu_seconds_grow_with_work_done_and_an_unknown_pid_is_an_error():
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) > before
    with pytest.raises(BenchError):
        cpu_seconds(2**22 + 1)  # above the default pid_max


@pytest.mark.parametrize(
    ("flag", "value"), [("--rounds", "0"), ("--rounds", "21"), ("--runs", "0"), ("--runs", "11")]
)
def test_rounds_and_runs_outside_their_bounds_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert flag in capsys.readouterr().err


def test_a_regression_is_confirmed_only_by_the_lowest_of_two_runs():
    first = {"d/(a+c)": {"1": 5.0, "8": 2.0}, "e/d": {"1": 0.9}}
    again = {"d/(a+c)": {"1": 3.0, "8": 2.5}, "b/a": {"1": 1.1}}
    assert lowest_ratios(first, again) == {
        "d/(a+c)": {"1": 3.0, "8": 2.0},
        "e/d": {"1": 0.9},
        "b/a": {"1": 1.1},
    }
    baseline = {"d/(a+c)": {"1": 3.5, "8": 1.5}}
    [confirmed] = compare_to_baseline(lowest_ratios(first, again), baseline)
    assert (confirmed.ratio, confirmed.concurrency) == ("d/(a+c)", 8)


def test_a_confirmed_regression_fails_unless_every_run_was_busy_with_other_work():
    [regression] = compare_to_baseline({"e/d": {"1": 0.9}}, {"e/d": {"1": 0.5}})
    assert guard_verdict([], [0.9]) == "pass"
    assert guard_verdict([regression], [0.02, 0.04]) == "fail"
    assert guard_verdict([regression], [0.6, 0.1]) == "fail"  # one quiet run is enough to believe it
    assert guard_verdict([regression], [0.6, 0.4]) == "inconclusive"
    assert guard_verdict([regression], []) == "fail"  # no measure of the machine: no excuse


def test_machine_busy_time_grows_with_work_done():
    from bench.procs import machine_busy_seconds

    before = machine_busy_seconds()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert machine_busy_seconds() > before


def test_the_audit_trails_bytes_count_every_audit_file_and_nothing_else(tmp_path):
    from bench.run import audit_bytes

    (tmp_path / "audit.jsonl").write_bytes(b"x" * 100)
    (tmp_path / "audit.jsonl.checkpoints").write_bytes(b"y" * 20)
    (tmp_path / "idmap.db").write_bytes(b"z" * 1000)
    assert audit_bytes(tmp_path) == 120
    assert audit_bytes(tmp_path / "missing") == 0


def test_the_cache_on_ratios_sit_beside_the_cache_off_ones():
    got = ratios(
        {
            "a_opa_bare": {1: 1.0},
            "c_fhir_bare": {1: 1.0},
            "d_sidecar_nocache": {1: 4.0},
            "d_dcache": {1: 3.0},
            "e_dcache": {1: 1.5},
            "f_peer_wso2": {1: 5.0},
        }
    )
    assert got["d/f"][1] == pytest.approx(0.8)
    assert got["d+/f"][1] == pytest.approx(0.6)
    assert got["d+/(a+c)"][1] == pytest.approx(1.5)
    assert got["e+/d+"][1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], ()),
        (["--ab-server"], ("sse", "asyncio", "provenance", "client")),
        (["--ab-server", "client"], ("client",)),
    ],
    ids=["off", "all", "one"],
)
def test_ab_server_names_the_choices_undone_and_alone_means_all_of_them(argv, want):
    assert tuple(parse_args(argv).ab_server or ()) == want


async def test_the_feature_cost_benchmark_measures_every_variant():
    from bench.features import measure

    result = await measure(calls=3, rounds=1)
    assert set(result) == {"base", "activity", "consent", "tracing"}
    assert all(value > 0 for value in result.values())

