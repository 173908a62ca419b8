"""Soak the sidecar: N tool calls from C concurrent MCP clients over streamable HTTP, then check it held.

    .venv/bin/python scripts/soak.py                       # the full run: 20,000 calls, 64 clients
    .venv/bin/python scripts/soak.py --calls 1500 --clients 16 --json

It starts the real FHIR test bed, writes a config with two API keys (a clinician's, a nurse's) and runs
`mcp-fhir serve` (which starts its own managed OPA) on loopback. Each client opens its own MCP session
with one key and makes calls from a fixed mix: allowed reads and searches, denied calls (the nurse on
medications, a patient the clinician's purpose does not cover), and erroring calls (an unknown patient,
a bad argument). Afterwards it checks, and reports:

* every call left exactly one `kind: access` audit record (audit count == call count);
* the audit hash chain verifies (`mcp_fhir.audit.verify.verify_file`);
* no response leaked across patients: every returned resource references only the requested patient,
  and no resource carries a security label the policy withholds without break-glass;
* memory is stable: the server's RSS, sampled through the run, grows by less than `--rss-bound-mb`
  between the end of warm-up and the end.

Exit status 0 when every check holds, 1 otherwise. Every wait is bounded (named constants below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx2  # noqa: E402
import yaml  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from mcp_fhir.agent_auth.api_keys import generate_api_key  # noqa: E402
from mcp_fhir.audit.settings import AuditSettings  # noqa: E402
from mcp_fhir.audit.verify import verify_file  # noqa: E402
from tests.testbed import data  # noqa: E402
from tests.testbed.sidecar import sidecar_config  # noqa: E402

DEFAULT_CALLS = 20_000
DEFAULT_CLIENTS = 64
DEFAULT_RSS_BOUND_MB = 64.0
SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 15.0
CALL_TIMEOUT = 30.0
SOAK_DECISION_TIMEOUT = 2.0  # above the 0.5 s default: the soak measures correctness under load, not shedding
RSS_SAMPLE_INTERVAL = 0.5
WARMUP_FRACTION = 0.1
WITHHELD_LABELS = frozenset({"PSY", "HIV", "ETH", "SDV", "R", "V"})
PATIENTS = sorted(data.PATIENTS)

# (key, tool, args builder, expected outcome)
MIX: list[tuple[str, str, str, str]] = [
    ("clinician", "read_patient", "treatment", "allowed"),
    ("clinician", "search_observations", "treatment", "allowed"),
    ("clinician", "search_conditions", "treatment", "allowed"),
    ("clinician", "search_medication_statements", "treatment", "allowed"),
    ("nurse", "search_observations", "treatment", "allowed"),
    ("nurse", "search_medication_statements", "treatment", "denied"),
    ("clinician", "search_observations", "audit", "denied"),
    ("clinician", "read_patient", "unknown", "error"),
    ("nurse", "read_patient", "bad-date", "error"),
]


@dataclass
class Report:
    calls: int = 0
    clients: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    fail_closed: int = 0
    audit_access_records: int = 0
    chain_ok: bool = False
    chain_entries: int = 0
    rss_mb_after_warmup: float = 0.0
    rss_mb_end: float = 0.0
    rss_mb_max: float = 0.0
    rss_growth_mb: float = 0.0
    rss_bound_mb: float = DEFAULT_RSS_BOUND_MB
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.unexpected
            and not self.leaks
            and self.audit_access_records == self.calls
            and self.chain_ok
            and self.rss_growth_mb < self.rss_bound_mb
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _args(kind: str, patient: str) -> dict[str, Any]:
    if kind == "unknown":
        return {"patient_id": "pat-nobody-at-all", "purpose": "treatment"}
    if kind == "bad-date":
        return {"patient_id": "not a valid id!", "purpose": "treatment"}
    return {"patient_id": patient, "purpose": kind}


def _check_leak(body: dict[str, Any], patient: str) -> str | None:
    for r in body.get("resources") or []:
        if r.get("resourceType") == "Patient":
            if r.get("id") != patient:
                return f"Patient/{r.get('id')} returned for {patient}"
            continue
        refs = {
            (r.get(k) or {}).get("reference") for k in ("subject", "patient") if isinstance(r.get(k), dict)
        }
        if refs != {f"Patient/{patient}"}:
            return f"{r.get('resourceType')}/{r.get('id')} references {sorted(map(str, refs))} for {patient}"
        labels = {c.get("code") for c in (r.get("meta") or {}).get("security") or []}
        if labels & WITHHELD_LABELS:
            return f"{r.get('resourceType')}/{r.get('id')} carries withheld labels"
    return None


def _outcome(result: Any) -> tuple[str, dict[str, Any] | None]:
    if isinstance(result, MCPError):
        return "error", None
    if result.is_error:
        err = json.loads(result.content[0].text)
        if err.get("code") == "policy_denied" and all(
            str(r).startswith("opa_") for r in err.get("reasons") or ()
        ):
            return "fail_closed", None  # OPA slow or unreachable under load: denied, as it must be
        return ("denied" if err.get("code") == "policy_denied" else "error"), None
    return "allowed", result.structured_content


async def _client(url: str, key: str, index: int, queue: asyncio.Queue[int], report: Report,
                  latencies: list[float]) -> None:  # fmt: skip
    key_name = "clinician" if index % 2 == 0 else "nurse"
    mix = [m for m in MIX if m[0] == key_name]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=CALL_TIMEOUT) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            while True:
                try:
                    n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                _, tool, kind, expected = mix[n % len(mix)]
                patient = PATIENTS[n % len(PATIENTS)]
                started = time.perf_counter()
                try:
                    result: Any = await client.call_tool(tool, _args(kind, patient))
                except MCPError as exc:
                    result = exc
                latencies.append(time.perf_counter() - started)
                report.calls += 1
                got, body = _outcome(result)
                report.outcomes[f"{key_name}:{tool}:{got}"] = (
                    report.outcomes.get(f"{key_name}:{tool}:{got}", 0) + 1
                )
                report.fail_closed += got == "fail_closed"
                if got != expected and got != "fail_closed":
                    report.unexpected.append(
                        f"call {n}: {key_name} {tool} {kind}: expected {expected}, got {got}"
                    )
                if body is not None:
                    leak = _check_leak(body, patient)
                    if leak:
                        report.leaks.append(leak)


def _write_config(workdir: Path, fhir_url: str, port: int) -> tuple[Path, dict[str, str]]:
    keys = {name: generate_api_key() for name in ("clinician", "nurse")}
    cfg = sidecar_config(
        workdir, fhir_url, transport="http",
        server={"transport": "http", "host": "127.0.0.1", "port": port},
        auth={"api_keys": [
            {"id": "soak-clinician", "hash": keys["clinician"][1], "claims": {"roles": ["clinician"]},
             "scopes": ["user/*.rs"]},
            {"id": "soak-nurse", "hash": keys["nurse"][1], "claims": {"roles": ["nurse"]},
             "scopes": ["user/Patient.rs", "user/Observation.rs"]},
        ]},
    )  # fmt: skip
    cfg["auth"].pop("local", None)
    cfg["opa"]["decision_timeout"] = SOAK_DECISION_TIMEOUT
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, {name: key for name, (key, _) in keys.items()}


def _spawn(config_path: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """`mcp-fhir serve` in a child process, with no MCP_FHIR_* settings leaking in from this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_") or k == "MCP_FHIR_OPA"}
    command = [sys.executable, "-m", "mcp_fhir.cli.main", "serve", "--config", str(config_path)]
    return subprocess.Popen(
        [*command, "--log-level", "WARNING"],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    async with httpx2.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mcp-fhir serve exited with {proc.returncode}")
            try:
                if (await http.get(f"{base}/healthz")).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("mcp-fhir serve did not become live in time")


async def _sample_rss(
    pid: int, samples: list[tuple[int, float]], report: Report, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        samples.append((report.calls, _rss_mb(pid)))
        try:
            await asyncio.wait_for(stop.wait(), RSS_SAMPLE_INTERVAL)
        except TimeoutError:
            pass


async def run_soak(
    calls: int, clients: int, *, fhir_url: str, workdir: Path, rss_bound_mb: float = DEFAULT_RSS_BOUND_MB
) -> Report:
    """Serve over HTTP, drive `calls` calls from `clients` clients, stop the server, then check everything."""
    port = _free_port()
    config_path, keys = _write_config(workdir, fhir_url, port)
    base = f"http://127.0.0.1:{port}"
    proc = _spawn(config_path, workdir)
    report = Report(clients=clients, rss_bound_mb=rss_bound_mb)
    samples: list[tuple[int, float]] = []
    latencies: list[float] = []
    try:
        await _wait_ready(base, proc)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(calls):
            queue.put_nowait(n)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(proc.pid, samples, report, stop))
        started = time.perf_counter()
        key_for = lambda i: keys["clinician" if i % 2 == 0 else "nurse"]  # noqa: E731
        await asyncio.gather(
            *(_client(f"{base}/mcp", key_for(i), i, queue, report, latencies) for i in range(clients))
        )
        report.seconds = round(time.perf_counter() - started, 2)
        samples.append((report.calls, _rss_mb(proc.pid)))
        stop.set()
        await sampler
    finally:
        proc.terminate()
        try:
            proc.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(SERVER_STOP_TIMEOUT)
    audit = workdir / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines() if line.strip()]
    report.audit_access_records = sum(1 for r in records if (r.get("record") or {}).get("kind") == "access")
    key = AuditSettings(path=str(audit)).signing_key_path  # the default key beside the audit directory
    verified = verify_file(audit, public_key=key.with_name(key.name + ".pub"))
    report.chain_ok, report.chain_entries = verified.ok, verified.entries
    warm = [mb for n, mb in samples if n >= calls * WARMUP_FRACTION and mb > 0] or [mb for _, mb in samples]
    report.rss_mb_after_warmup = round(warm[0], 1) if warm else 0.0
    report.rss_mb_end = round(samples[-1][1], 1) if samples else 0.0
    report.rss_mb_max = round(max((mb for _, mb in samples), default=0.0), 1)
    report.rss_growth_mb = round(report.rss_mb_end - report.rss_mb_after_warmup, 1)
    ordered = sorted(latencies)
    if ordered:
        report.latency_p50_ms = round(ordered[len(ordered) // 2] * 1000, 1)
        report.latency_p99_ms = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1)
    report.unexpected = report.unexpected[:20]
    report.leaks = report.leaks[:20]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    p.add_argument("--rss-bound-mb", type=float, default=DEFAULT_RSS_BOUND_MB)
    p.add_argument("--fhir-url", help="an already running FHIR test bed (default: start one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcp-fhir-soak-") as tmp:
        workdir = Path(tmp)
        if args.fhir_url:
            report = asyncio.run(run_soak(args.calls, args.clients, fhir_url=args.fhir_url, workdir=workdir,
                                          rss_bound_mb=args.rss_bound_mb))  # fmt: skip
        else:
            from tests.testbed.fhir import start_fhir_server

            with start_fhir_server() as fhir:
                report = asyncio.run(run_soak(args.calls, args.clients, fhir_url=fhir.base_url, workdir=workdir,
                                              rss_bound_mb=args.rss_bound_mb))  # fmt: skip
    out = {**asdict(report), "ok": report.ok}
    print(json.dumps(out, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
