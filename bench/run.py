"""`python -m bench.run`: every figure of issue #10 in one run, on the same data.

Starts the FHIR test bed, one managed OPA with decision logging on, and sidecar processes
(`mcp-fhir serve`, streamable HTTP, API-key auth, durable file audit), then measures:

    a  bare HTTP POST of the decision input to OPA (aiohttp, keep-alive, like the load generator)
    b  the sidecar's decision step in-process (DecisionInput.to_opa + OpaPolicyEngine.evaluate)
    c  bare FHIR GET Patient/<id>
    d  read_patient through the sidecar, cache off
    e  read_patient through a second sidecar, cache on and warm
    f  WSO2 fhir-mcp-server 0.10.0 `read` on the same test bed, no policy (when installed)

at each concurrency, plus (b) under a paced 300 calls/s load, sidecar memory, and optionally a
py-spy profile (`--profile`) and a two-replica scale-out (`--scale-out`). Prints one table and
writes `bench/results/latest.json`. `--quick --check bench/baseline.json` is the CI guard.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx2

from bench import profile as profiling
from bench.load import CellSamples, Op, run_cell_samples, run_paced
from bench.mcp_session import McpSession
from bench.procs import (
    REPO,
    Child,
    cpu_seconds,
    machine_busy_seconds,
    memory_kib,
    peer_available,
    start_peer,
    start_sidecar,
)
from bench.sidecar import PATIENT, PURPOSE, mcp_stream, sidecar_cfg
from bench.stats import (
    RATIOS,
    BenchError,
    CellResult,
    compare_to_baseline,
    guard_verdict,
    median_ratios,
    ratios,
)

FULL_CONCURRENCY = (1, 8, 32, 128)
QUICK_CONCURRENCY = (1, 8)
FULL_CELL_SECONDS = 5.0
QUICK_CELL_SECONDS = 0.4  # per round; a quick cell is QUICK_ROUNDS rounds of this
QUICK_ROUNDS = 5  # interleaved rounds in --quick: the CI guard compares the median ratio
MAX_ROUNDS = 20
MAX_RUNS = 10
PACED_RATE = 300.0  # calls/s for the decision-latency target
FULL_PACED_SECONDS = 5.0
QUICK_PACED_SECONDS = 2.0
DEFAULT_RESULTS = REPO / "bench" / "results" / "latest.json"
HTTP_POOL = 256  # connections in each bare client: more than the largest concurrency
CELL_LABELS = {
    "a_opa_bare": "a  OPA bare POST",
    "b_decision_inproc": "b  decision in-process",
    "c_fhir_bare": "c  FHIR bare GET",
    "d_sidecar_nocache": "d  sidecar, cache off",
    "e_sidecar_cache": "e  sidecar, cache warm",
    "f_peer_wso2": "f  WSO2 peer",
    "d_sse": "d' sidecar, SSE responses",
    "d_asyncio": 'd" sidecar, asyncio + h11',
    "d_provenance": "dp sidecar, provenance",
    "d_dcache": "d+ sidecar, decision cache",
    "e_dcache": "e+ cache warm + dec. cache",
    "b_provenance": "bp decision, provenance",
    "b_decision_old": "b0 decision, old client",
}
# --ab-server: d beside the same sidecar with one choice undone (cache off in all of them).
AB_SIDECARS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # cell: (--ab-server choice, sidecar name, config overrides)
    "d_sse": ("sse", "sidecar-sse", {"server": {"json_response": False}}),
    "d_asyncio": ("asyncio", "sidecar-asyncio", {"server": {"event_loop": "asyncio", "http_parser": "h11"}}),
    "d_provenance": ("provenance", "sidecar-provenance", {"opa": {"revision_from": "provenance"}}),
}
AB_CHOICES = ("sse", "asyncio", "provenance", "client")
# The decision cache on (full mode; issue #20 asks for its figures beside the cache-off ones).
DCACHE_SIDECARS: dict[str, tuple[str, dict[str, Any]]] = {
    "d_dcache": ("sidecar-dcache", {"cache": {"enabled": False}, "opa": {"decision_cache": True}}),
    "e_dcache": ("sidecar-cache-dcache", {"cache": {"enabled": True}, "opa": {"decision_cache": True}}),
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        mem_kib = int(Path("/proc/meminfo").read_text(encoding="ascii").split()[1])
    except (OSError, ValueError, IndexError):
        pass
    from mcp_fhir.policy.managed_opa import find_opa
    from tests.testbed.fhir import NODE_BINARY

    def version(argv: list[str]) -> str:
        try:
            return (
                subprocess.run(argv, capture_output=True, text=True, timeout=10)
                .stdout.splitlines()[0]
                .strip()
            )
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "opa": version([find_opa(), "version"]),
        "node": version([str(NODE_BINARY), "--version"]),
        "kernel": platform.release(),
        # Other work on the machine skews absolute figures; ratios are measured side by side.
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


async def _no_audit(_record: object) -> None:
    """The in-process cached decider's audit writer: the bench's decide cells write no trail."""


def audit_bytes(directory: Path) -> int:
    """Bytes of a sidecar's audit trail (every `audit*` file in its directory: records and checkpoints)."""
    try:
        return sum(p.stat().st_size for p in directory.glob("audit*") if p.is_file())
    except OSError:
        return 0


def shared(op: Op):
    @asynccontextmanager
    async def factory() -> AsyncIterator[Op]:
        yield op

    return factory


async def official_client_check(
    url: str, bearer: str | None, tool: str, arguments: dict[str, Any], *, legacy: bool = False
) -> None:
    """One call through the official `mcp.Client`: the lean load session must match what it sees."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    http = httpx2.AsyncClient(headers=headers, timeout=30)
    kwargs: dict[str, Any] = {"mode": "legacy"} if legacy else {}
    async with http, Client(streamable_http_client(url, http_client=http), **kwargs) as client:
        result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise BenchError(f"{tool} through the official client returned a tool error")


def recorded_decision_input(audit_path: Path) -> dict[str, Any]:
    """The decision input of the sanity call, as the sidecar sent it (from its audit record)."""
    for line in reversed(audit_path.read_text(encoding="utf-8").splitlines()):
        record = json.loads(line).get("record") or {}
        if record.get("kind") == "access" and record.get("decision_input"):
            return dict(record["decision_input"])
    raise BenchError("no decision input in the sidecar's audit trail")


async def peer_read_args(url: str) -> tuple[str, dict[str, Any]]:
    """The WSO2 peer's `read` tool and arguments for Patient/<id>, checked against its tools/list schema."""
    session = McpSession(url)
    try:
        await session.open()
        tools = {t["name"]: t for t in await session.list_tools()}
    finally:
        await session.aclose()
    if "read" not in tools:
        raise BenchError("the peer has no `read` tool")
    props = set((tools["read"].get("inputSchema") or {}).get("properties") or {})
    args: dict[str, Any] = {}
    args["type" if "type" in props else "resource_type"] = "Patient"
    args["id" if "id" in props else "resource_id"] = PATIENT
    unknown = set(args) - props
    if unknown:
        raise BenchError(f"the peer's read schema does not take {sorted(unknown)}")
    return "read", args


class Bench:
    """One run: the children it started, the cells it measured, and what it found."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.quick: bool = args.quick
        self.concurrency = QUICK_CONCURRENCY if self.quick else tuple(args.concurrency or FULL_CONCURRENCY)
        self.seconds = QUICK_CELL_SECONDS if self.quick else args.seconds
        self.rounds: int = QUICK_ROUNDS if self.quick else args.rounds
        self.cells: dict[str, dict[int, CellResult]] = {}
        self._samples: dict[str, dict[int, CellSamples]] = {}
        # concurrency -> one dict per round: cell -> that round's p50 (ms)
        self._round_p50: dict[int, list[dict[str, float]]] = {}
        # Processes whose CPU time is charged to each cell: name -> pid (set once they run).
        self.cpu_pids: dict[str, int] = {"harness": os.getpid()}
        self.ab: dict[str, Child] = {}  # --ab-server: cell -> the sidecar with one choice undone
        self.dcache: dict[str, Child] = {}  # cell -> a sidecar with the decision cache on
        self.ab_choices: tuple[str, ...] = tuple(args.ab_server or ())
        self.decision_cache: bool = not self.quick and args.decision_cache
        # cell -> [audit bytes written, calls] (issue #19 §5: the trail's bytes per call)
        self._audit_bytes: dict[str, dict[int, list[int]]] = {}
        self._audit_dirs: dict[str, Path] = {}
        # cell -> concurrency -> [calls, {process: CPU seconds}]
        self._cpu: dict[str, dict[int, tuple[int, dict[str, float]]]] = {}
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.children: list[Child] = []
        self._closers: list[Any] = []

    def log(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    async def cell(self, name: str, factory: Any, conc: int, round_no: int = 0) -> CellResult | None:
        """Measure one round of a cell; its samples join the cell's earlier rounds."""
        audit_dir = self._audit_dirs.get(name)
        try:
            audit_before = audit_bytes(audit_dir) if audit_dir is not None else 0
            cpu_before = {proc: cpu_seconds(pid) for proc, pid in self.cpu_pids.items()}
            samples = await run_cell_samples(factory, conc, seconds=self.seconds)
            cpu_after = {proc: cpu_seconds(pid) for proc, pid in self.cpu_pids.items()}
            audit_after = audit_bytes(audit_dir) if audit_dir is not None else 0
        except (BenchError, OSError, TimeoutError, httpx2.HTTPError, aiohttp.ClientError) as exc:
            self.notes.append(f"{name} c={conc} round {round_no + 1} failed: {type(exc).__name__}")
            self.log(f"{name} c={conc} failed: {type(exc).__name__}")
            return None
        result = samples.summary()
        # Every call the processes served: measured ones, errors and one warm-up per stream.
        calls, used = self._cpu.setdefault(name, {}).get(conc, (0, {}))
        calls += len(samples.latencies) + samples.errors + conc
        for proc in cpu_after:
            used[proc] = used.get(proc, 0.0) + cpu_after[proc] - cpu_before[proc]
        self._cpu[name][conc] = (calls, used)
        if audit_dir is not None:
            written = self._audit_bytes.setdefault(name, {}).setdefault(conc, [0, 0])
            written[0] += audit_after - audit_before
            written[1] += len(samples.latencies) + samples.errors + conc
        rounds = self._round_p50.setdefault(conc, [])
        while len(rounds) <= round_no:
            rounds.append({})
        rounds[round_no][name] = result.p50_ms
        merged = self._samples.setdefault(name, {}).get(conc)
        if merged is None:
            merged = self._samples[name][conc] = CellSamples([], 0, 0.0)
        merged.latencies += samples.latencies
        merged.errors += samples.errors
        merged.seconds += samples.seconds
        self.cells.setdefault(name, {})[conc] = merged.summary()
        tag = f" round {round_no + 1}/{self.rounds}" if self.rounds > 1 else ""
        self.log(
            f"{name:20} c={conc:<4} p50={result.p50_ms:7.2f} ms p99={result.p99_ms:7.2f} ms "
            f"{result.throughput:8.1f}/s errors={result.errors}{tag}"
        )
        return result

    async def run(self) -> dict[str, Any]:
        from mcp_fhir.agent_auth.api_keys import generate_api_key
        from mcp_fhir.policy.managed_opa import ManagedOpa
        from tests.testbed.fhir import start_fhir_server
        from tests.testbed.sidecar import POLICIES

        self.log("starting the FHIR test bed")
        with start_fhir_server(read_latency_ms=self.args.ehr_latency_ms) as fhir:
            async with ManagedOpa([POLICIES], decision_log=self.workdir / "opa-decisions.log") as opa:
                key, digest = generate_api_key()
                nocache = await self._sidecar(
                    "sidecar-nocache", fhir.base_url, opa.url, digest, cache={"enabled": False}
                )
                cached = await self._sidecar(
                    "sidecar-cache", fhir.base_url, opa.url, digest, cache={"enabled": True}
                )
                for cell_name, (choice, name, overrides) in AB_SIDECARS.items():
                    if choice not in self.ab_choices:
                        continue
                    overrides = {"cache": {"enabled": False}, **overrides}
                    child = await self._sidecar(name, fhir.base_url, opa.url, digest, **overrides)
                    self.ab[cell_name] = child
                    self.cpu_pids[name] = child.pid
                for cell_name, (name, overrides) in DCACHE_SIDECARS.items() if self.decision_cache else ():
                    child = await self._sidecar(name, fhir.base_url, opa.url, digest, **overrides)
                    self.dcache[cell_name] = child
                    self.cpu_pids[name] = child.pid
                if opa.process is not None:
                    self.cpu_pids["opa"] = opa.process.pid
                self.cpu_pids |= {
                    "fhir": fhir.process.pid,
                    nocache.name: nocache.pid,
                    cached.name: cached.pid,
                }
                self._audit_dirs = {
                    "d_sidecar_nocache": self.workdir / nocache.name,
                    "e_sidecar_cache": self.workdir / cached.name,
                    **{cell: self.workdir / child.name for cell, child in (self.ab | self.dcache).items()},
                }
                try:
                    busy, ours, began = machine_busy_seconds(), self._our_cpu(), time.monotonic()
                    await self._measure(fhir.base_url, opa.url, key, nocache, cached)
                    foreign = machine_busy_seconds() - busy - (self._our_cpu() - ours)
                    capacity = (time.monotonic() - began) * (os.cpu_count() or 1)
                    self.extra["foreign_cpu_share"] = round(max(0.0, foreign) / capacity, 3)
                finally:
                    for close in self._closers:
                        await close()
                    for child in self.children:
                        await child.stop()
            if self.args.scale_out:
                from bench.scaleout import scale_out

                self.extra["scale_out"] = await scale_out(self, fhir.base_url)
        return self.report()

    async def _sidecar(self, name: str, fhir_url: str, opa_url: str, digest: str, **overrides: Any) -> Child:
        from mcp_fhir.policy.managed_opa import free_port

        port = free_port()
        cfg = sidecar_cfg(self.workdir / name, fhir_url, opa_url, digest, port, **overrides)
        cfg["server"]["metrics_port"] = free_port()
        self.log(f"starting {name} on port {port}")
        child = await start_sidecar(name, cfg, self.workdir)
        child.metrics_port = cfg["server"]["metrics_port"]
        self.children.append(child)
        return child

    async def _measure(self, fhir_url: str, opa_url: str, key: str, nocache: Child, cached: Child) -> None:
        from opa_client.opa_async import AsyncOpaClient

        from mcp_fhir.agent_auth.subject import Subject
        from mcp_fhir.policy.decide import Decider, DecisionCache
        from mcp_fhir.policy.engine import Decision
        from mcp_fhir.policy.input import DecisionInput
        from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings

        arguments = {"patient_id": PATIENT, "purpose": PURPOSE}
        for child in (nocache, cached, *self.ab.values(), *self.dcache.values()):
            await official_client_check(child.url, key, "read_patient", arguments)
        recorded = recorded_decision_input(self.workdir / "sidecar-nocache" / "audit.jsonl")
        subject_in = recorded["subject"]
        subject = Subject(
            id=subject_in["id"],
            authn=subject_in["authn"],
            claims=subject_in["claims"],
            scopes=tuple(subject_in["scopes"]),
            on_behalf_of=subject_in.get("on_behalf_of"),
        )
        action, resource = recorded["action"], recorded["resource"]
        body = json.dumps({"input": recorded}).encode()
        decision_url = f"{opa_url}/v1/data/mcp_fhir/authz/decision?provenance=true"
        limits = httpx2.Limits(max_connections=HTTP_POOL, max_keepalive_connections=HTTP_POOL)
        self.extra["memory"] = {"idle_kib": {c.name: memory_kib(c.pid) for c in (nocache, cached)}}

        async with (
            httpx2.AsyncClient(limits=limits, timeout=10) as http,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=HTTP_POOL), timeout=aiohttp.ClientTimeout(total=10)
            ) as bare,
            OpaPolicyEngine(OpaSettings(url=opa_url)) as engine,
            OpaPolicyEngine(OpaSettings(url=opa_url, revision_from="provenance")) as engine_provenance,
        ):
            opa_port = int(opa_url.rsplit(":", 1)[1])
            old_client = AsyncOpaClient(host="127.0.0.1", port=opa_port, retries=0, timeout=0.5)
            await old_client.__aenter__()
            self._closers.append(old_client.close_connection)

            def bench_decision_input() -> DecisionInput:
                return DecisionInput(
                    subject=subject,
                    tool=action["tool"],
                    operation=action["operation"],
                    resource_type=action["resource_type"],
                    patient=resource["patient"],
                    params=resource["params"],
                    purpose=PURPOSE,
                    break_glass_reason=None,
                    backend="testbed",
                    request_id=os.urandom(16).hex(),
                )

            def bench_input() -> dict[str, Any]:
                return bench_decision_input().to_opa()

            async def decide_provenance() -> None:
                if not (await engine_provenance.evaluate(bench_input())).allow:
                    raise BenchError("the benchmark decision was a deny")

            async def decide_old() -> None:
                """The decide step before issue #20: opa-python-client's query_rule, ?provenance=true."""
                async with asyncio.timeout(0.5):
                    body = await old_client.query_rule(
                        dict(bench_input()),
                        package_path="mcp_fhir.authz",
                        rule_name="decision",
                        query_params={"provenance": "true"},
                    )
                bundles = (body.get("provenance") or {}).get("bundles") or {}
                revision = ",".join(sorted(str(b.get("revision")) for b in bundles.values())) or None
                if not Decision.parse(body, decision_id=body.get("decision_id"), revision=revision).allow:
                    raise BenchError("the benchmark decision was a deny")

            cached_decider = Decider(engine, audit=_no_audit, cache=DecisionCache())

            async def decide_cached() -> None:
                if not (await cached_decider.decide(bench_decision_input())).allow:
                    raise BenchError("the benchmark decision was a deny")

            # The bare cells use the load generator's client (aiohttp, `bench/mcp_session.py`).
            async def opa_bare() -> None:
                headers = {"Content-Type": "application/json"}
                async with bare.post(decision_url, data=body, headers=headers) as r:
                    answer = await r.json(content_type=None)
                if r.status != 200 or "result" not in answer:
                    raise BenchError("OPA answered without a result")

            async def decide() -> None:
                if not (await engine.evaluate(bench_input())).allow:
                    raise BenchError("the benchmark decision was a deny")

            async def fhir_bare() -> None:
                headers = {"Accept": "application/fhir+json"}
                async with bare.get(f"{fhir_url}/Patient/{PATIENT}", headers=headers) as r:
                    await r.json(content_type=None)
                if r.status != 200:
                    raise BenchError("the FHIR read failed")

            peer = await self._peer(fhir_url)
            for conc in self.concurrency:
                peak: dict[str, int] = {}
                for r in range(self.rounds):
                    await self.cell("a_opa_bare", shared(opa_bare), conc, r)
                    await self.cell("b_decision_inproc", shared(decide), conc, r)
                    if "provenance" in self.ab_choices:
                        await self.cell("b_provenance", shared(decide_provenance), conc, r)
                    if "client" in self.ab_choices:
                        await self.cell("b_decision_old", shared(decide_old), conc, r)
                    await self.cell("c_fhir_bare", shared(fhir_bare), conc, r)
                    sampler = MemorySampler(nocache.pid)
                    async with sampler:
                        await self.cell(
                            "d_sidecar_nocache",
                            lambda: mcp_stream(nocache.url, key, "read_patient", arguments),
                            conc,
                            r,
                        )
                    for k, v in sampler.result().items():
                        peak[k] = max(peak.get(k, 0), v)
                    for cell_name, child in (self.ab | self.dcache).items():
                        await self.cell(
                            cell_name,
                            lambda u=child.url: mcp_stream(u, key, "read_patient", arguments),  # type: ignore[misc]
                            conc,
                            r,
                        )
                    await self.cell(
                        "e_sidecar_cache",
                        lambda: mcp_stream(cached.url, key, "read_patient", arguments),
                        conc,
                        r,
                    )
                    if peer is not None:
                        peer_url, (tool, peer_args) = peer[0].url, peer[1]
                        await self.cell(
                            "f_peer_wso2",
                            lambda u=peer_url, t=tool, a=peer_args: mcp_stream(u, None, t, a),  # type: ignore[misc]
                            conc,
                            r,
                        )
                self.extra["memory"].setdefault("under_load_kib", {})[f"d c={conc}"] = peak
            paced_seconds = QUICK_PACED_SECONDS if self.quick else FULL_PACED_SECONDS
            paced = await run_paced(decide, rate=PACED_RATE, seconds=paced_seconds)
            self.extra["paced_decision"] = {"rate": PACED_RATE, "seconds": paced_seconds, **paced.to_dict()}
            self.log(
                f"paced decision at {PACED_RATE:g}/s: p50={paced.p50_ms:.2f} ms p99={paced.p99_ms:.2f} ms"
            )
            if self.decision_cache:
                paced = await run_paced(decide_cached, rate=PACED_RATE, seconds=paced_seconds)
                self.extra["paced_decision_cached"] = {
                    "rate": PACED_RATE,
                    "seconds": paced_seconds,
                    **paced.to_dict(),
                }
                self.log(f"paced decision, cache on: p50={paced.p50_ms:.2f} ms p99={paced.p99_ms:.2f} ms")
            self.extra["memory"]["final_kib"] = {c.name: memory_kib(c.pid) for c in (nocache, cached)}
            self.extra["step_means_ms"] = {c.name: await step_means(http, c) for c in (nocache, cached)}
            if self.args.profile:
                self.extra["profile"] = await profiling.profile_sidecar(
                    self, nocache, lambda: mcp_stream(nocache.url, key, "read_patient", arguments)
                )

    async def _peer(self, fhir_url: str) -> tuple[Child, tuple[str, dict[str, Any]]] | None:
        want = self.args.peer if self.args.peer is not None else not self.quick
        if not want:
            return None
        if not peer_available():
            self.notes.append("peer skipped: .tools/peer-venv is not installed (see docs/performance.md)")
            return None
        from mcp_fhir.policy.managed_opa import free_port

        try:
            child = await start_peer(fhir_url, free_port(), self.workdir)
        except BenchError as exc:
            self.notes.append(f"peer skipped: {exc}")
            return None
        self.children.append(child)
        self.cpu_pids["peer"] = child.pid
        tool_args = await peer_read_args(child.url)
        await official_client_check(child.url, None, *tool_args, legacy=True)
        return child, tool_args

    def report(self) -> dict[str, Any]:
        ratio_values = self.ratio_values()
        return {
            "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": "quick" if self.quick else "full",
            "cell_seconds": self.seconds,
            "rounds": self.rounds,
            "ehr_read_latency_ms": self.args.ehr_latency_ms,
            "ratio_rounds": {
                str(conc): [
                    {name: round(by_c[conc], 4) for name, by_c in self._round_ratios(conc, one).items()}
                    for one in per_round
                ]
                for conc, per_round in self._round_p50.items()
            },
            "machine": machine(),
            "cells": {n: {str(c): r.to_dict() for c, r in by_c.items()} for n, by_c in self.cells.items()},
            "ratios": {n: {str(c): round(v, 4) for c, v in by_c.items()} for n, by_c in ratio_values.items()},
            "targets": target_targets(self, ratio_values),
            "cpu_ms_per_call": {
                name: {
                    str(conc): {proc: round(sec / calls * 1000.0, 3) for proc, sec in used.items()}
                    for conc, (calls, used) in by_c.items()
                }
                for name, by_c in self._cpu.items()
            },
            "audit_bytes_per_call": {
                name: {str(conc): round(written / calls) for conc, (written, calls) in by_c.items() if calls}
                for name, by_c in self._audit_bytes.items()
            },
            "notes": self.notes,
            **self.extra,
        }

    def cpu_per_call(self) -> dict[str, dict[int, dict[str, float]]]:
        """CPU ms per call by cell, concurrency and process."""
        return {
            name: {
                conc: {proc: sec / calls * 1000.0 for proc, sec in used.items()}
                for conc, (calls, used) in by_c.items()
            }
            for name, by_c in self._cpu.items()
        }

    def _our_cpu(self) -> float:
        """CPU seconds of every process this run started (and of the harness itself)."""
        return sum(cpu_seconds(pid) for pid in self.cpu_pids.values())

    def ratio_values(self) -> dict[str, dict[int, float]]:
        """The ratios of p50 latency: over one round, as measured; over several, the median per-round ratio."""
        if self.rounds == 1:
            return ratios({name: {c: r.p50_ms for c, r in by_c.items()} for name, by_c in self.cells.items()})
        per_round = [
            self._round_ratios(conc, one) for conc, rounds in self._round_p50.items() for one in rounds
        ]
        return median_ratios(per_round)

    @staticmethod
    def _round_ratios(conc: int, p50_by_cell: dict[str, float]) -> dict[str, dict[int, float]]:
        return ratios({name: {conc: p50} for name, p50 in p50_by_cell.items()})


def target_targets(bench: Bench, ratio_values: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """Issue #20's targets 1-4 (cache off), each with its decision-cache-on figure beside it when measured."""
    rows: list[dict[str, Any]] = []

    def row(target: str, value: float | None, bound: float | None, cache_on: float | None = None) -> None:
        met = None if value is None or bound is None else value <= bound
        rows.append({"target": target, "value": value, "met": met, "cache_on": cache_on})

    def ratio(name: str, conc: int) -> float | None:
        return (ratio_values.get(name) or {}).get(conc)

    for conc in bench.concurrency:
        if ratio("d/f", conc) is not None:
            row(f"1. d/f <= 1.0 (p50, c={conc})", ratio("d/f", conc), 1.0, ratio("d+/f", conc))
    opa_cpu = (bench.cpu_per_call().get("b_decision_inproc") or {}).get(bench.concurrency[0], {}).get("opa")
    if opa_cpu is not None:
        row(f"2. OPA CPU per decision <= 0.3 ms (b, c={bench.concurrency[0]})", opa_cpu, 0.3)
    paced = bench.extra.get("paced_decision")
    if paced:
        cached = bench.extra.get("paced_decision_cached") or {}
        row("3. decision p99 <= 2 ms at 300 calls/s", paced["p99_ms"], 2.0, cached.get("p99_ms"))
    far = bench.args.ehr_latency_ms > 0
    row(
        "4. e/d <= 0.3 (p50, c=1)" + ("" if far else " [needs --ehr-latency-ms 20]"),
        ratio("e/d", 1),
        0.3 if far else None,
        ratio("e+/d+", 1),
    )
    row(
        "4. d/(a+c) <= 1.2 (p50, c=1)" + ("" if far else " [needs --ehr-latency-ms 20]"),
        ratio("d/(a+c)", 1),
        1.2 if far else None,
        ratio("d+/(a+c)", 1),
    )
    if ratio("b/a", 1) is not None:
        row("b/a <= 1.3 (p50, c=1; issue #10)", ratio("b/a", 1), 1.3)
    return rows


STEP_HISTOGRAMS = {
    "decision": "mcp_fhir_decision_seconds",
    "audit_write": "mcp_fhir_audit_write_seconds",
    "fhir_upstream": "mcp_fhir_upstream_seconds",
}


def histogram_means(text: str) -> dict[str, float]:
    """Mean of each step histogram (sum/count over all label sets), in ms, from Prometheus text."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        metric, _, value = line.rpartition(" ")
        name = metric.split("{", 1)[0]
        for step, base in STEP_HISTOGRAMS.items():
            if name == base + "_sum":
                sums[step] = sums.get(step, 0.0) + float(value)
            elif name == base + "_count":
                counts[step] = counts.get(step, 0.0) + float(value)
    return {step: round(sums[step] / counts[step] * 1000.0, 3) for step in sums if counts.get(step)}


async def step_means(http: httpx2.AsyncClient, child: Child) -> dict[str, float]:
    """The sidecar's own per-step timings over the whole run, from its metrics endpoint."""
    port = child.metrics_port
    if port is None:
        return {}
    response = await http.get(f"http://127.0.0.1:{port}/metrics")
    return histogram_means(response.text) if response.status_code == 200 else {}


class MemorySampler:
    """Polls a child's VmRSS while a cell runs and keeps the maximum (VmHWM is the lifetime peak)."""

    INTERVAL = 0.1

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_rss = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def _poll(self) -> None:
        while not self._stop.is_set():
            self.max_rss = max(self.max_rss, memory_kib(self.pid).get("VmRSS", 0))
            try:
                await asyncio.wait_for(self._stop.wait(), self.INTERVAL)
            except TimeoutError:
                pass

    async def __aenter__(self) -> MemorySampler:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def result(self) -> dict[str, int]:
        return {"max_VmRSS": self.max_rss, **{k: v for k, v in memory_kib(self.pid).items() if k == "VmHWM"}}


def fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def table(report: dict[str, Any]) -> str:
    """The one table: p50/p90/p99 (ms) and calls/s per measurement and concurrency; ratios; targets."""
    lines = [
        f"{'measurement':26} {'c':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'calls/s':>9} {'err':>5}"
    ]
    for name, by_c in report["cells"].items():
        for conc, cell in by_c.items():
            lines.append(
                f"{CELL_LABELS.get(name, name):26} {conc:>4} {fmt(cell['p50_ms']):>8} "
                f"{fmt(cell['p90_ms']):>8} "
                f"{fmt(cell['p99_ms']):>8} {cell['throughput']:>9.1f} {cell['errors']:>5}"
            )
    cpu = report.get("cpu_ms_per_call") or {}
    procs = sorted({p for by_c in cpu.values() for used in by_c.values() for p in used})
    if procs:
        lines.append("")
        lines.append(
            f"{'CPU ms per call':26} {'c':>4} " + " ".join(f"{p[:15]:>15}" for p in procs) + f" {'total':>8}"
        )
        for name, by_c in cpu.items():
            for conc, used in by_c.items():
                lines.append(
                    f"{CELL_LABELS.get(name, name):26} {conc:>4} "
                    + " ".join(f"{used.get(p, 0.0):>15.2f}" for p in procs)
                    + f" {sum(used.values()):>8.2f}"
                )
    lines.append("")
    lines.append(
        "ratios of p50 latency: "
        + "  ".join(
            f"{name} " + ", ".join(f"c={c}: {v:.2f}" for c, v in by_c.items())
            for name, by_c in report["ratios"].items()
        )
    )
    lines.append(f"  {'target (cache off)':58} {'value':>8}  {'':6}  {'cache on':>8}")
    for row in report["targets"]:
        status = "n/a" if row["met"] is None else ("MET" if row["met"] else "MISSED")
        value = "—" if row["value"] is None else f"{row['value']:.3f}"
        cache_on = "" if row.get("cache_on") is None else f"{row['cache_on']:.3f}"
        lines.append(f"  {row['target']:58} {value:>8}  {status:6}  {cache_on:>8}")
    for name, steps in (report.get("step_means_ms") or {}).items():
        lines.append(
            f"  {name} mean per step (ms, whole run): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
        )
    for key, label in (
        ("paced_decision", "paced decision"),
        ("paced_decision_cached", "paced, decision cache on"),
    ):
        paced = report.get(key)
        if paced:
            lines.append(
                f"  {label} {paced['rate']:g}/s: p50 {paced['p50_ms']:.2f} ms, "
                f"p99 {paced['p99_ms']:.2f} ms, "
                f"{paced['errors']} errors"
            )
    for name, by_c in (report.get("audit_bytes_per_call") or {}).items():
        lines.append(
            f"  audit trail bytes per call, {CELL_LABELS.get(name, name).strip()}: "
            + ", ".join(f"c={c}: {v:,}" for c, v in by_c.items())
        )
    if "foreign_cpu_share" in report:
        lines.append(
            f"  other work on the machine during the measurements: {report['foreign_cpu_share'] * 100:.0f}% "
            "of its CPU"
        )
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: 1 s cells, concurrency 1 and 8, no peer")
    p.add_argument(
        "--seconds", type=float, default=FULL_CELL_SECONDS, help="seconds per cell and round (full mode)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds per cell; ratios are per-round medians"
    )
    p.add_argument("--concurrency", type=int, nargs="+", help="streams per cell (full mode)")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peer", dest="peer", action="store_true", default=None, help="measure the WSO2 peer")
    peer.add_argument("--no-peer", dest="peer", action="store_false")
    p.add_argument("--profile", action="store_true", help="py-spy the sidecar at c=1 and c=32")
    p.add_argument("--scale-out", action="store_true", help="two replicas over Redis and PostgreSQL")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="where to write the JSON results")
    p.add_argument("--check", type=Path, help="fail if a ratio grew >25%% over this baseline")
    p.add_argument("--write-baseline", type=Path, help="write this run's ratios as a baseline")
    p.add_argument("--runs", type=int, default=1, help="complete runs; ratios are their medians")
    p.add_argument(
        "--ehr-latency-ms",
        type=int,
        default=0,
        help="the FHIR test bed answers every read this much later, like an EHR across a network",
    )
    p.add_argument(
        "--ab-server",
        nargs="*",
        choices=AB_CHOICES,
        default=None,
        help="beside d (and b) in every round, the same with one choice undone: sse (SSE responses), "
        "asyncio (asyncio + h11), provenance (?provenance=true on every decision: sidecar dp and in-process "
        "bp), client (in-process b0: the decide step on opa-python-client with provenance, as before "
        "issue #20). No choice named: all of them",
    )
    p.add_argument(
        "--no-decision-cache",
        dest="decision_cache",
        action="store_false",
        help="skip the sidecars with the decision cache on (d+, e+; full mode only)",
    )
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.ab_server is not None and not args.ab_server:
        args.ab_server = list(AB_CHOICES)
    if args.seconds <= 0 or args.seconds > 120:
        p.error("--seconds must be between 0 and 120")
    from tests.testbed.fhir import MAX_READ_LATENCY_MS

    if not 0 <= args.ehr_latency_ms <= MAX_READ_LATENCY_MS:
        p.error(f"--ehr-latency-ms must be between 0 and {MAX_READ_LATENCY_MS}")
    if not 1 <= args.runs <= MAX_RUNS:
        p.error(f"--runs must be between 1 and {MAX_RUNS}")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        p.error(f"--rounds must be between 1 and {MAX_ROUNDS}")
    return args


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    """One complete run: start everything, measure, stop, print the table and write the JSON."""
    workdir = Path(tempfile.mkdtemp(prefix="mcp-fhir-bench-"))
    try:
        report = asyncio.run(Bench(args, workdir).run())
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))
    print(f"\nwrote {args.out}")
    return report


def lowest_ratios(*runs: Mapping[str, Mapping[Any, float]]) -> dict[str, dict[Any, float]]:
    """Each ratio's lowest value over several runs (a regression must show in every one)."""
    out: dict[str, dict[Any, float]] = {}
    for run in runs:
        for name, by_c in run.items():
            for conc, value in by_c.items():
                known = out.setdefault(name, {}).get(conc)
                out[name][conc] = value if known is None else min(known, value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reports = [run_once(args) for _ in range(args.runs)]
    now = median_ratios([r["ratios"] for r in reports]) if len(reports) > 1 else reports[0]["ratios"]
    if len(reports) > 1:
        print("median ratios over the runs: " + json.dumps(now))
    if args.write_baseline:
        baseline = {
            "comment": (
                f"ratios of p50 latency from `python -m bench.run --quick`, the median of {args.runs} "
                "run(s); lower is better"
            ),
            "ratios": {n: {str(c): round(v, 4) for c, v in by_c.items()} for n, by_c in now.items()},
        }
        args.write_baseline.write_text(json.dumps(baseline, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.write_baseline}")
    if args.check:
        baseline = json.loads(args.check.read_text(encoding="utf-8"))
        regressions = compare_to_baseline(now, baseline.get("ratios") or {})
        if regressions:
            # A real regression shows again; a burst of load on a shared machine seldom does.
            print("a ratio grew by more than 25%: measuring again to confirm")
            again = run_once(args)
            reports.append(again)
            regressions = compare_to_baseline(
                lowest_ratios(now, again["ratios"]), baseline.get("ratios") or {}
            )
        shares = [r["foreign_cpu_share"] for r in reports if "foreign_cpu_share" in r]
        verdict = guard_verdict(regressions, shares)
        for regression in regressions:
            print(f"{'REGRESSION' if verdict == 'fail' else 'UNCONFIRMED'} {regression}")
        if verdict == "inconclusive":
            print(
                "INCONCLUSIVE: other work used "
                + ", ".join(f"{share * 100:.0f}%" for share in shares)
                + " of the machine's CPU during these runs; the guard cannot tell a regression from it"
            )
            return 0
        if verdict == "fail":
            return 1
        print(f"no ratio regressed by more than 25% against {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RATIOS", "main"]
