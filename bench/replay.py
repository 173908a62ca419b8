"""`python -m bench.replay`: the rate of `mcp-fhir policy diff --replay` over a large audit trail.

Writes a hash-chained JSON-lines audit trail of N access records (default 100,000, a realistic
month at a small site) whose `decision_input`s are drawn, with a fixed seed, from the policy's own
grid (every role, tool, purpose, claim variant), with a unique request id, a patient from a pool
of 2,000 and an instant spread over 30 days (so after-hours alerts vary). Then it runs the real
command, `policy diff BASE HEAD --replay TRAIL --no-grid --no-fixtures --format json`, where BASE is
`policies/` and HEAD a copy in which the nurse role also reads MedicationStatement (a real
widening, so the classification work is included), and prints the end-to-end rate: inputs
replayed per second, trail reading, evaluation and classification all included. Because wall time
on a shared machine says more about the neighbours than about the code, it also prints the CPU
seconds of each part, as the command itself measures them (`--cpu-out`): reading the trail,
building the distinct decision inputs, serialising them, each side's `opa eval` children, decoding
OPA's answers, comparing, writing the report, and the rest of this process; then inputs per
CPU-second (the figure that a noisy machine does not move), OPA's share of the CPU, and the rate
that CPU cost gives on this machine's cores when they are idle. Records are the trail's access
records; distinct inputs are those the diff evaluates (equal but for the request id = one).

    python -m bench.replay [--records 100000] [--policies policies] [--keep DIR] [--trail FILE] [--json]

Issue #20, target 5: at least 2,000 inputs/s. The trail is synthetic, PHI-free, and written into
a temporary folder unless `--keep` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mcp_fhir.audit.chain import ChainHead, canonical_json, seal
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.cli.main import main as cli_main
from mcp_fhir.governance.diff import BatchEvaluator
from mcp_fhir.governance.grid import GRID_OTHER_PATIENT, GRID_PATIENT, grid_cases

__all__ = ["main", "write_trail"]

DEFAULT_RECORDS = 100_000
PATIENTS = 2_000
DAYS = 30
SEED = 20
START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
NURSE_READ = "  read: [Observation, Patient]"
NURSE_READ_WIDER = "  read: [MedicationStatement, Observation, Patient]"


def _sample_inputs(policies: Path) -> list[dict[str, Any]]:
    config = BatchEvaluator(policies).query("data.mcp_fhir.config")
    return [c.input for c in grid_cases([config if isinstance(config, dict) else {}])]


def _vary(template: dict[str, Any], rng: random.Random, n: int) -> dict[str, Any]:
    inp = json.loads(json.dumps(template))
    patient = f"pat-{rng.randrange(PATIENTS):05d}"
    if inp["resource"]["patient"] is not None:
        inp["resource"]["patient"] = patient
    claims = inp["subject"]["claims"]
    for key, value in list(claims.items()):
        if value == GRID_PATIENT:
            claims[key] = patient
        elif value == GRID_OTHER_PATIENT:
            claims[key] = f"pat-{(rng.randrange(PATIENTS) + 1) % PATIENTS:05d}"
    moment = START + timedelta(seconds=rng.randrange(DAYS * 86_400), milliseconds=rng.randrange(1000))
    inp["context"]["time"] = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    inp["context"]["request_id"] = f"bench-{n:07d}"
    return inp


def write_trail(path: Path, records: int, policies: Path) -> int:
    """A hash-chained JSON-lines trail of `records` access records; returns its size in bytes."""
    rng = random.Random(SEED)
    samples = _sample_inputs(policies)
    head = ChainHead()
    with path.open("wb") as fh:
        for n in range(records):
            inp = _vary(rng.choice(samples), rng, n)
            record = AuditRecord(
                ts=inp["context"]["time"], request_id=inp["context"]["request_id"],
                subject_id=inp["subject"]["id"], authn="oauth", tool=inp["action"]["tool"],
                resource_type=inp["action"]["resource_type"], operation=inp["action"]["operation"],
                patient=inp["resource"]["patient"], backend="default", scopes=tuple(inp["subject"]["scopes"]),
                purpose=inp["context"]["purpose"], decision_id=f"dec-{n}", decision_input=inp,
            )  # fmt: skip
            fh.write(canonical_json(seal(head, {"record": record.to_dict()})) + b"\n")
    return path.stat().st_size


def _widened_copy(policies: Path, workdir: Path) -> Path:
    copy = workdir / "head-policies"
    shutil.copytree(policies, copy)
    roles = copy / "mcp_fhir" / "config" / "roles" / "data.yaml"
    text = roles.read_text(encoding="utf-8")
    roles.write_text(text.replace(NURSE_READ, NURSE_READ_WIDER), encoding="utf-8")
    return copy


OPA_PARTS = ("opa_base", "opa_head")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--policies", type=Path, default=Path("policies"))
    parser.add_argument("--keep", type=Path, help="write the trail and the report here and keep them")
    parser.add_argument("--trail", type=Path, help="replay this existing trail instead of writing one")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    if args.records < 1:
        parser.error("--records must be at least 1")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="mcp-fhir-replay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        trail = args.trail or workdir / "audit.jsonl"
        started = time.perf_counter()
        size = trail.stat().st_size if args.trail else write_trail(trail, args.records, args.policies)
        written = time.perf_counter() - started
        head = _widened_copy(args.policies, workdir)
        out, cpu_out = workdir / "report.json", workdir / "cpu.json"
        started = time.perf_counter()
        code = cli_main(["policy", "diff", str(args.policies), str(head), "--replay", str(trail), "--no-grid",
                         "--no-fixtures", "--format", "json", "--out", str(out), "--quiet",
                         "--cpu-out", str(cpu_out)])  # fmt: skip
        seconds = time.perf_counter() - started
        report = json.loads(out.read_text(encoding="utf-8"))
        measured = json.loads(cpu_out.read_text(encoding="utf-8"))
        cpu, counts = measured["cpu_s"], measured["counts"]
        inputs = report["evaluated"]
        opa_s = sum(cpu.get(k, 0.0) for k in OPA_PARTS)
        python_s = cpu["total"] - opa_s
        cores = os.cpu_count() or 1
        per_cpu_s = inputs / cpu["total"]
        figures = {
            "records": sum(1 for _ in trail.open("rb")) if args.trail else args.records,
            "trail_mb": round(size / 1e6, 1),
            "trail_write_s": round(written, 2),
            "inputs": inputs,
            "distinct_inputs": counts.get("distinct", inputs),
            "opa_runs": counts.get("opa_base_runs", 0) + counts.get("opa_head_runs", 0),
            "seconds": round(seconds, 2),
            "inputs_per_s": round(inputs / seconds),
            "cpu_s": cpu,
            "inputs_per_cpu_s": round(per_cpu_s),
            "opa_cpu_share": round(opa_s / cpu["total"], 3),
            "opa_cpu_ms_per_input": round(opa_s / inputs * 1e3, 3),
            "python_cpu_ms_per_input": round(python_s / inputs * 1e3, 3),
            "cores": cores,
            "inputs_per_s_on_idle_cores": round(cores * per_cpu_s),
            "loadavg_1m": round(os.getloadavg()[0], 1),
            "counts": report["counts"],
            "exit_code": code,
        }
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"trail: {figures['records']:,} records, {figures['trail_mb']} MB (written in "
              f"{figures['trail_write_s']} s)")  # fmt: skip
        print(f"policy diff --replay: {figures['inputs']:,} inputs ({figures['distinct_inputs']:,} distinct, "
              f"{figures['opa_runs']} opa runs) in {figures['seconds']} s = {figures['inputs_per_s']:,} inputs/s "
              f"(target >= 2,000; load average {figures['loadavg_1m']})")  # fmt: skip
        parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "total")
        print(f"CPU seconds: {parts}; total {cpu['total']:.2f}")
        print(f"= {figures['inputs_per_cpu_s']:,} inputs per CPU-second; OPA {figures['opa_cpu_ms_per_input']} ms "
              f"per input (both sides, {figures['opa_cpu_share']:.0%} of the CPU) + Python "
              f"{figures['python_cpu_ms_per_input']} ms; on {cores} idle core(s) that is "
              f"{figures['inputs_per_s_on_idle_cores']:,} inputs/s")  # fmt: skip
        print(
            f"changes: {figures['counts']} (exit {code}; 1 when a widened input is unapproved, as intended)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
