"""The pure parts of the harness: percentiles, cell summaries, the published ratios, baseline checks.

Everything here is deterministic and free of I/O, so `tests/bench/test_bench_smoke.py` can pin it.
Ratios compare latencies measured in the same run on the same data; a ratio (not an absolute
time) is what the CI guard compares against `bench/baseline.json`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_REGRESSION_TOLERANCE = 0.25  # a ratio may grow by this fraction before --check fails
PERCENTILES = (50.0, 90.0, 99.0)

# name → (numerator cell, denominator cells summed, target or None). Cells are measurement keys.
RATIOS: Mapping[str, tuple[str, tuple[str, ...], float | None]] = {
    "b/a": ("b_decision_inproc", ("a_opa_bare",), 1.3),
    "d/(a+c)": ("d_sidecar_nocache", ("a_opa_bare", "c_fhir_bare"), 1.5),
    "d/f": ("d_sidecar_nocache", ("f_peer_wso2",), 1.0),
    "e/d": ("e_sidecar_cache", ("d_sidecar_nocache",), 0.5),
    # The decision cache on (issue #20: the targets hold with it off; these are printed beside them).
    "d+/(a+c)": ("d_dcache", ("a_opa_bare", "c_fhir_bare"), None),
    "d+/f": ("d_dcache", ("f_peer_wso2",), None),
    "e+/d+": ("e_dcache", ("d_dcache",), None),
    "d+/d": ("d_dcache", ("d_sidecar_nocache",), None),
    # --ab-server: the sidecar as shipped over the same sidecar with one choice undone.
    "d/d_sse": ("d_sidecar_nocache", ("d_sse",), None),
    "d/d_asyncio": ("d_sidecar_nocache", ("d_asyncio",), None),
    "d/d_provenance": ("d_sidecar_nocache", ("d_provenance",), None),
    # --ab-server, in-process: the decide step as shipped over the same step with one choice undone.
    "b/b_provenance": ("b_decision_inproc", ("b_provenance",), None),
    "b_provenance/b_old": ("b_provenance", ("b_decision_old",), None),
    "b/b_old": ("b_decision_inproc", ("b_decision_old",), None),
}


class BenchError(Exception):
    """A harness failure (a bad argument, a malformed baseline); never carries PHI."""


def percentile(samples: Sequence[float], pct: float) -> float:
    """The `pct`th percentile by linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise BenchError("no samples")
    if not 0.0 <= pct <= 100.0:
        raise BenchError("percentile must be between 0 and 100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class CellResult:
    """One measurement at one concurrency: latency percentiles in milliseconds and throughput."""

    calls: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "throughput": round(self.throughput, 1),
        }


def summarise(latencies_s: Sequence[float], *, errors: int, seconds: float) -> CellResult:
    """Latencies (seconds, successful calls only) over a wall-clock window → a `CellResult`."""
    if seconds <= 0:
        raise BenchError("the measured window must be positive")
    if not latencies_s:
        return CellResult(0, errors, seconds, math.nan, math.nan, math.nan, 0.0)
    p50, p90, p99 = (percentile(latencies_s, p) * 1000.0 for p in PERCENTILES)
    return CellResult(len(latencies_s), errors, seconds, p50, p90, p99, len(latencies_s) / seconds)


def ratios(
    p50_by_cell: Mapping[str, Mapping[int, float]], *, stat: str = "p50_ms"
) -> dict[str, dict[int, float]]:
    """Every ratio in `RATIOS` at every concurrency where all its cells were measured.

    `p50_by_cell[cell][concurrency]` is a latency in ms. A missing or non-finite cell leaves
    the ratio out at that concurrency rather than inventing one.
    """
    out: dict[str, dict[int, float]] = {}
    for name, (num, dens, _target) in RATIOS.items():
        per_c: dict[int, float] = {}
        for conc, value in (p50_by_cell.get(num) or {}).items():
            parts = [(p50_by_cell.get(d) or {}).get(conc) for d in dens]
            if any(p is None or not math.isfinite(p) for p in parts) or not math.isfinite(value):
                continue
            denominator = sum(p for p in parts if p is not None)
            if denominator <= 0:
                continue
            per_c[conc] = value / denominator
        if per_c:
            out[name] = per_c
    return out


def median_ratios(rounds: Sequence[Mapping[str, Mapping[Any, float]]]) -> dict[str, dict[Any, float]]:
    """Each ratio's median over interleaved rounds (each round's ratios from that round's cells).

    Measuring every cell in turn, round after round, and taking the median of the per-round ratios
    keeps a burst of background load from landing on one cell only: a burst moves one round, not
    the median. A ratio missing from some rounds is the median of the rounds that have it.
    """
    collected: dict[str, dict[Any, list[float]]] = {}
    for one in rounds:
        for name, by_c in one.items():
            for conc, value in by_c.items():
                collected.setdefault(name, {}).setdefault(conc, []).append(value)
    return {
        name: {conc: statistics.median(values) for conc, values in by_c.items()}
        for name, by_c in collected.items()
    }


@dataclass(frozen=True, slots=True)
class Regression:
    """A ratio that grew beyond the tolerance against the baseline."""

    ratio: str
    concurrency: int
    baseline: float
    current: float

    @property
    def growth(self) -> float:
        return self.current / self.baseline - 1.0

    def __str__(self) -> str:
        return (
            f"{self.ratio} at c={self.concurrency}: {self.current:.3f} vs baseline {self.baseline:.3f} "
            f"(+{self.growth * 100:.0f}%)"
        )


def compare_to_baseline(
    current: Mapping[str, Mapping[Any, float]],
    baseline: Mapping[str, Mapping[Any, float]],
    *,
    tolerance: float = DEFAULT_REGRESSION_TOLERANCE,
) -> list[Regression]:
    """Ratios (lower is better) that grew by more than `tolerance` over the baseline.

    Keys may be ints or their JSON string form. A ratio present in the baseline but absent now
    is not a regression (the peer is optional); one absent from the baseline is not checked.
    """
    if not 0 < tolerance < 10:
        raise BenchError("tolerance must be a fraction between 0 and 10")
    found: list[Regression] = []
    for name, by_c in baseline.items():
        now = {int(k): v for k, v in (current.get(name) or {}).items()}
        for conc_key, base in by_c.items():
            conc = int(conc_key)
            if not isinstance(base, int | float) or base <= 0 or conc not in now:
                continue
            if now[conc] > base * (1.0 + tolerance):
                found.append(Regression(name, conc, float(base), float(now[conc])))
    return found


BUSY_SHARE = 0.25  # other work using more of the machine's CPU than this makes a run "busy"


def guard_verdict(regressions: Sequence[Regression], foreign_shares: Sequence[float]) -> str:
    """ "pass", "fail", or "inconclusive": confirmed regressions measured only while other work
    (not the benchmark's processes) used more than `BUSY_SHARE` of the machine cannot be told from
    that work's interference, so they do not fail the build; they are reported as such.
    """
    if not regressions:
        return "pass"
    if foreign_shares and min(foreign_shares) > BUSY_SHARE:
        return "inconclusive"
    return "fail"


def target_report(
    ratio_values: Mapping[str, Mapping[int, float]], *, at_concurrency: int = 1
) -> list[tuple[str, float | None, float, bool | None]]:
    """(ratio, value at `at_concurrency`, target, met?) for every ratio with a target."""
    rows = []
    for name, (_n, _d, target) in RATIOS.items():
        if target is None:
            continue
        value = (ratio_values.get(name) or {}).get(at_concurrency)
        rows.append((name, value, target, None if value is None else value <= target))
    return rows
