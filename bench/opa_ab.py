"""`python -m bench.opa_ab`: the decide step's levers one at a time, in interleaved rounds, in CPU per decision.

Side by side on one machine, each variant in turn, round after round (the median of the rounds is
printed, and every round): the CPU that OPA's process spends per decision (`/proc/<pid>/stat`, 10 ms
ticks, so a round of N decisions resolves 10/N ms) and the CPU of this Python process per decision,
for the benchmark's `read_patient` allow (the nurse, with decision logging on as shipped):

    shipped        the sidecar's engine (`OpaPolicyEngine`): revision from OPA's status API, OPA at GOGC=400
    provenance     the same, `revision_from: provenance` (?provenance=true on every decision)
    old client     the decide step before issue #20, as it was written (opa-python-client's `query_rule`,
                   ?provenance=true); the engine's own POST is on the same client again, after a plain
                   aiohttp POST measured no cheaper
    GOGC default   the shipped engine against a second OPA at Go's default GC target (GOGC=100)
    no decision log  the shipped engine against a third OPA without decision logging (not shippable: shows
                   what logging and its mask cost)
    constant       the floor: the shipped engine against an OPA whose policy is one constant `decision`
                   (the shipped allow's own value) beside the shipped decision-log mask, logging on, so what
                   is left is OPA's HTTP server, input parsing, the mask and the decision log
    constant, no mask  the same without the mask policy (logging on): what the console log alone costs
    constant, no log   the same without decision logging: OPA's HTTP server and input parsing alone

The shipped figure less the constant one is what evaluating the policy costs; the constant figure is
what any policy, however cheap, would cost through OPA's REST API with decision logging as shipped.

It also prints OPA's own timers for the shipped decision (`?metrics=true`: evaluation, input parse,
server handler), which say how much of OPA's CPU per decision is the policy. Wall time is printed
too, but on a shared machine it measures the neighbours more than the code.

    python -m bench.opa_ab [--decisions 300] [--rounds 5] [--out bench/results/opa-ab.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.procs import REPO, cpu_seconds


def constant_policy(folder: Path, value: Any) -> Path:
    """A policies folder whose `decision` is `value`, whatever the input, beside the shipped mask."""
    authz = folder / "mcp_fhir" / "authz"
    authz.mkdir(parents=True)
    (authz / "constant.rego").write_text(
        f"package mcp_fhir.authz\n\ndecision := {json.dumps(value)}\n", encoding="utf-8"
    )
    shutil.copytree(REPO / "policies" / "system", folder / "system")
    return folder


async def measure(decisions: int, rounds: int, workdir: Path) -> dict[str, Any]:
    from opa_client.opa_async import AsyncOpaClient

    from mcp_fhir.agent_auth.subject import Subject
    from mcp_fhir.governance.diff import BatchEvaluator
    from mcp_fhir.policy.engine import Decision
    from mcp_fhir.policy.input import decision_input
    from mcp_fhir.policy.managed_opa import ManagedOpa
    from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings
    from tests.testbed.sidecar import NURSE, POLICIES

    claims: dict[str, Any] = dict(NURSE["claims"])  # type: ignore[arg-type]
    subject = Subject(id="bench-agent", authn="api_key", claims=claims, scopes=tuple(NURSE["scopes"]))

    def bench_input() -> dict[str, Any]:
        return decision_input(
            subject=subject,
            tool="read_patient",
            operation="read",
            resource_type="Patient",
            patient="pat-au-001",
            params={},
            purpose="treatment",
            break_glass_reason=None,
            backend="testbed",
            request_id=os.urandom(16).hex(),
        )

    # the shipped allow's own value, decided once by `opa eval`, is the constant policy's decision
    shipped_value = BatchEvaluator(POLICIES).decide_chunk([bench_input()])[0]
    constant_folder = constant_policy(workdir / "constant", shipped_value)
    shipped_opa = ManagedOpa([POLICIES], decision_log=workdir / "shipped.log")
    default_gc_opa = ManagedOpa([POLICIES], decision_log=workdir / "gogc-default.log", gogc="100")
    no_log_opa = ManagedOpa([POLICIES])
    constant_opa = ManagedOpa([constant_folder], decision_log=workdir / "constant.log")
    unmasked_opa = ManagedOpa(
        [constant_folder], decision_log=workdir / "unmasked.log", extra_args=["--ignore", "mask.rego"]
    )
    constant_no_log_opa = ManagedOpa([constant_folder])
    async with shipped_opa, default_gc_opa, no_log_opa, constant_opa, unmasked_opa, constant_no_log_opa:
        shipped = OpaPolicyEngine(OpaSettings(url=shipped_opa.url))
        provenance = OpaPolicyEngine(OpaSettings(url=shipped_opa.url, revision_from="provenance"))
        default_gc = OpaPolicyEngine(OpaSettings(url=default_gc_opa.url))
        no_log = OpaPolicyEngine(OpaSettings(url=no_log_opa.url))
        constant = OpaPolicyEngine(OpaSettings(url=constant_opa.url))
        unmasked = OpaPolicyEngine(OpaSettings(url=unmasked_opa.url))
        constant_no_log = OpaPolicyEngine(OpaSettings(url=constant_no_log_opa.url))
        port = int(shipped_opa.url.rsplit(":", 1)[1])
        old = AsyncOpaClient(host="127.0.0.1", port=port, retries=0, timeout=0.5)
        async with shipped, provenance, default_gc, no_log, constant, unmasked, constant_no_log:
            await old.__aenter__()
            try:

                async def old_client() -> Decision:
                    async with asyncio.timeout(0.5):
                        body = await old.query_rule(
                            dict(bench_input()),
                            package_path="mcp_fhir.authz",
                            rule_name="decision",
                            query_params={"provenance": "true"},
                        )
                    return Decision.parse(body, decision_id=body.get("decision_id"))

                variants: dict[str, tuple[Callable[[], Awaitable[Decision]], ManagedOpa]] = {
                    "shipped": (lambda: shipped.evaluate(bench_input()), shipped_opa),
                    "provenance": (lambda: provenance.evaluate(bench_input()), shipped_opa),
                    "old client": (old_client, shipped_opa),
                    "GOGC default": (lambda: default_gc.evaluate(bench_input()), default_gc_opa),
                    "no decision log": (lambda: no_log.evaluate(bench_input()), no_log_opa),
                    "constant": (lambda: constant.evaluate(bench_input()), constant_opa),
                    "constant, no mask": (lambda: unmasked.evaluate(bench_input()), unmasked_opa),
                    "constant, no log": (
                        lambda: constant_no_log.evaluate(bench_input()),
                        constant_no_log_opa,
                    ),
                }
                found: dict[str, dict[str, list[float]]] = {
                    k: {"opa": [], "python": [], "wall": []} for k in variants
                }
                for op, _ in variants.values():  # warm-up
                    for _ in range(50):
                        if not (await op()).allow:
                            raise SystemExit("the benchmark decision was a deny")
                for _ in range(rounds):
                    for name, (op, opa) in variants.items():
                        assert opa.process is not None
                        opa_before, py_before, began = (
                            cpu_seconds(opa.process.pid),
                            time.process_time(),
                            time.perf_counter(),
                        )
                        for _ in range(decisions):
                            await op()
                        row = found[name]
                        row["opa"].append((cpu_seconds(opa.process.pid) - opa_before) / decisions * 1e6)
                        row["python"].append((time.process_time() - py_before) / decisions * 1e6)
                        row["wall"].append((time.perf_counter() - began) / decisions * 1e6)
                # Where OPA's time goes: its own timers for one decision (evaluation, input parse, handler).
                timers: dict[str, list[float]] = {}
                for _ in range(decisions):
                    async with asyncio.timeout(5):
                        body = await old.query_rule(
                            bench_input(),
                            package_path="mcp_fhir.authz",
                            rule_name="decision",
                            query_params={"metrics": "true"},
                        )
                    for key, value in (body.get("metrics") or {}).items():
                        if key.startswith("timer_"):
                            timers.setdefault(key, []).append(value / 1000.0)
            finally:
                await old.close_connection()
    return {
        "opa_timers_us": {key: round(statistics.median(values)) for key, values in sorted(timers.items())},
        "decisions_per_round": decisions,
        "rounds": rounds,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "us_per_decision": {
            name: {
                k: {"median": round(statistics.median(v)), "rounds": [round(x) for x in v]}
                for k, v in row.items()
            }
            for name, row in found.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.opa_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=300, help="decisions per variant and round (10..5000)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (1..20)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "opa-ab.json")
    args = p.parse_args(argv)
    if not 10 <= args.decisions <= 5000 or not 1 <= args.rounds <= 20:
        p.error("--decisions must be 10..5000 and --rounds 1..20")
    with tempfile.TemporaryDirectory(prefix="mcp-fhir-opa-ab-") as tmp:
        report = asyncio.run(measure(args.decisions, args.rounds, Path(tmp)))
    print(
        f"{'variant':18} {'OPA CPU us':>11} {'Python CPU us':>14} {'wall us':>9}   (medians of {args.rounds} rounds)"
    )
    for name, row in report["us_per_decision"].items():
        print(
            f"{name:18} {row['opa']['median']:>11} {row['python']['median']:>14} {row['wall']['median']:>9}"
        )
    timers = ", ".join(
        f"{k.removeprefix('timer_').removesuffix('_ns')} {v}" for k, v in report["opa_timers_us"].items()
    )
    print(f"OPA's own timers for one shipped decision (?metrics=true, median us): {timers}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
