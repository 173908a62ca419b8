"""`mcp-fhir serve` as an operator runs it: a real process over HTTP on loopback, its own managed OPA.

- the managed OPA is killed under a bounded load: while it is down no call is allowed, and calls are
  served again once the supervisor has restarted it (counted in `mcp_fhir_opa_restarts_total`);
- request heads of 200 KB and 4 MB are answered 431 by both HTTP parsers, and the server stays healthy;
- SIGTERM under a bounded load: in-flight calls drain, every answered call is audited, the trail is sealed
  and verifies, the OPA child is gone, and the exit status is 0;
- SIGHUP: a key added to the config works and a key removed from it stops working, without a restart;
- readiness probes each backend (`/metadata`): a wrong base URL is NOT READY, reported per backend;
- a metrics port in use is a one-line error and a non-zero exit, with no traceback;
- metrics carry the process collectors and `mcp_fhir_build_info`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mcp_fhir.cli.main import main
from tests.integration._ops_harness import REPO, ApiKeyIdentity, ServedSidecar, http_config, wait_for
from tests.testbed import data
from tests.testbed.sidecar import NURSE, POLICIES

pytestmark = pytest.mark.integration

ARGS = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
MAX_CALLS = 2000  # bound on every load loop
LOAD_DEADLINE_S = 90.0
RECOVERY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0
CONCURRENT_CLIENTS = 4
CALLS_BEFORE_SIGTERM = 12


# --- helpers ----------------------------------------------------------------------------------------


def opa_children(pid: int) -> list[tuple[int, int]]:
    """The live `opa` children of `pid` and the loopback port each serves, from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
            except FileNotFoundError:
                continue
            if state != "Z" and cmdline and cmdline[0].endswith(b"opa") and b"--addr" in cmdline:
                addr = cmdline[cmdline.index(b"--addr") + 1].decode()
                found.append((int(child), int(addr.rpartition(":")[2])))
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def is_unavailable_deny(result: Any) -> bool:
    return bool(result.is_error) and "opa_unavailable" in result.content[0].text


def initialize_status(sidecar: ServedSidecar, key: str) -> int:
    """The HTTP status of an MCP initialize presenting `key`: 200 accepted, 401 rejected."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "ops-test", "version": "1"},
        },
    }
    headers = {
        "Authorization": f"Bearer {key}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    return httpx2.post(sidecar.mcp_url, json=body, headers=headers, timeout=10.0).status_code


def audit_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def nurse() -> ApiKeyIdentity:
    return ApiKeyIdentity(NURSE)


@pytest.fixture
def sidecar(tmp_path: Path, fhir_server, nurse) -> Iterator[ServedSidecar]:
    with ServedSidecar(tmp_path, http_config(tmp_path, fhir_server.base_url, [nurse])) as served:
        wait_for(lambda: served.readyz()[0] == 200, timeout=RECOVERY_TIMEOUT_S, what="readiness")
        yield served


# --- #16 §4: the managed OPA heals --------------------------------------------------------------------


async def test_a_killed_managed_opa_denies_every_call_while_down_and_serves_again_after_its_restart(
    sidecar: ServedSidecar, nurse
):
    assert sidecar.process is not None
    async with sidecar.client(nurse.key) as client:
        assert not (await client.call_tool("read_patient", ARGS)).is_error
        [(opa_pid, port)] = opa_children(sidecar.process.pid)
        os.kill(opa_pid, signal.SIGKILL)
        wait_for(lambda: not listening(port), timeout=10.0, what="the killed OPA's port to close")
        while_down, served_again = [], None
        deadline = time.monotonic() + LOAD_DEADLINE_S
        for _ in range(MAX_CALLS):
            if time.monotonic() > deadline:
                break
            result = await client.call_tool("read_patient", ARGS)
            if not listening(port):
                while_down.append(result)  # OPA was not listening at any time during this call
            elif not result.is_error:
                served_again = result
                break
    assert while_down, "no call was made while OPA was down"
    assert all(is_unavailable_deny(r) for r in while_down)
    assert served_again is not None, "calls were not served again after the restart"
    [(new_pid, new_port)] = opa_children(sidecar.process.pid)
    assert (new_pid != opa_pid, new_port) == (True, port)
    scraped = samples(sidecar.scrape())
    assert scraped[("mcp_fhir_opa_restarts_total", frozenset({("reason", "exited")}))] == 1.0
    wait_for(lambda: sidecar.readyz()[0] == 200, timeout=RECOVERY_TIMEOUT_S, what="readiness to recover")


# --- #16 §5: header limits, and a clean exit on SIGTERM --------------------------------------------------


@pytest.mark.parametrize("parser", ["h11", "httptools"])
@pytest.mark.parametrize("size", [200 * 1024, 4 * 1024 * 1024], ids=["200KB", "4MB"])
def test_an_oversized_request_head_gets_431_and_the_server_stays_healthy(
    tmp_path: Path, fhir_server, nurse, parser: str, size: int
):
    cfg = http_config(tmp_path, fhir_server.base_url, [nurse], server={"http_parser": parser})
    with ServedSidecar(tmp_path, cfg) as sidecar:
        big = httpx2.get(sidecar.base_url + "/healthz", headers={"X-Big": "a" * size}, timeout=30.0)
        many = httpx2.get(
            sidecar.base_url + "/healthz",
            headers={f"X-Many-{i}": "b" * 100 for i in range(size // 110)},
            timeout=30.0,
        )
        assert (big.status_code, many.status_code) == (431, 431)
        assert httpx2.get(sidecar.base_url + "/healthz", timeout=10.0).status_code == 200
        normal = {"X-Fine": "c" * 4096}  # an ordinary large header (4 KB) is still served
        assert httpx2.get(sidecar.base_url + "/healthz", headers=normal, timeout=10.0).status_code == 200
        assert sidecar.process is not None and sidecar.process.poll() is None


async def test_sigterm_under_load_drains_audits_every_answered_call_seals_the_trail_and_exits_zero(
    sidecar: ServedSidecar, nurse, tmp_path: Path
):
    assert sidecar.process is not None
    proc = sidecar.process
    answered: list[int] = []
    enough = asyncio.Event()

    async def agent() -> None:
        try:
            async with sidecar.client(nurse.key) as client:
                for _ in range(MAX_CALLS // CONCURRENT_CLIENTS):
                    result = await client.call_tool("read_patient", ARGS)
                    if not result.is_error:
                        answered.append(1)
                    if len(answered) >= CALLS_BEFORE_SIGTERM:
                        enough.set()
        except Exception:  # the server went away mid-stream: this agent's load ends
            return

    agents = [asyncio.create_task(agent()) for _ in range(CONCURRENT_CLIENTS)]
    async with asyncio.timeout(LOAD_DEADLINE_S):
        await enough.wait()
    opa = opa_children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    status = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_S)
    async with asyncio.timeout(EXIT_TIMEOUT_S):
        await asyncio.gather(*agents)
    assert status == 0, sidecar.stderr()[-2000:]
    assert "Traceback" not in sidecar.stderr()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid, _ in opa), timeout=10.0, what="OPA exit")

    trail = Path(sidecar.cfg["audit"]["path"])
    records = [e["record"] for e in audit_entries(trail) if "record" in e]
    allowed = [r for r in records if r.get("tool") == "read_patient" and r.get("result") == "allowed"]
    assert len(allowed) >= len(answered) >= CALLS_BEFORE_SIGTERM
    verify = [sys.executable, "-m", "mcp_fhir.cli.main", "audit", "verify", "--path", str(trail), "--json"]
    # the signing key's default place: a sibling of the audit directory (pinned here by its public key)
    public_key = trail.parent.with_name(trail.parent.name + "-keys") / "audit-signing.pem.pub"
    verify += ["--public-key", str(public_key)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["ok"], report["after_last_checkpoint"]) == (True, 0)


# --- #17 §3: SIGHUP, per-backend readiness, a metrics port in use --------------------------------------


def test_sighup_reloads_api_keys_and_policy_data_a_new_key_works_and_a_removed_one_stops(
    tmp_path: Path, fhir_server, nurse
):
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies, ignore=shutil.ignore_patterns("fixtures"))
    cfg = http_config(tmp_path, fhir_server.base_url, [nurse], opa={"policies": str(policies)})
    with ServedSidecar(tmp_path, cfg) as sidecar:
        assert sidecar.process is not None
        newcomer = ApiKeyIdentity({**NURSE, "id": "agent-nurse-rotated"})
        assert (initialize_status(sidecar, nurse.key), initialize_status(sidecar, newcomer.key)) == (200, 401)
        revision_before = build_info(sidecar)["policy_revision"]
        [(_, opa_port)] = opa_children(sidecar.process.pid)
        probe = f"http://127.0.0.1:{opa_port}/v1/data/reload_probe/marker"
        assert "result" not in httpx2.get(probe, timeout=5.0).json()

        (policies / "reload_probe").mkdir()
        (policies / "reload_probe" / "data.json").write_text('{"marker": 7}', encoding="utf-8")
        cfg = {**sidecar.cfg, "auth": {"api_keys": [newcomer.entry]}}
        sidecar.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        sidecar.process.send_signal(signal.SIGHUP)

        wait_for(
            lambda: initialize_status(sidecar, newcomer.key) == 200, timeout=RECOVERY_TIMEOUT_S, what="reload"
        )
        assert initialize_status(sidecar, nurse.key) == 401
        wait_for(lambda: reload_restarts(sidecar) == 1.0, timeout=RECOVERY_TIMEOUT_S, what="the OPA reload")
        assert httpx2.get(probe, timeout=5.0).json()["result"] == 7  # the policy data was read again
        assert build_info(sidecar)["policy_revision"] != revision_before
        wait_for(
            lambda: sidecar.readyz()[0] == 200, timeout=RECOVERY_TIMEOUT_S, what="readiness after reload"
        )
        assert sidecar.process.poll() is None


def build_info(sidecar: ServedSidecar) -> dict[str, str]:
    [labels] = [dict(lbl) for name, lbl in samples(sidecar.scrape()) if name == "mcp_fhir_build_info"]
    return labels


def reload_restarts(sidecar: ServedSidecar) -> float:
    key = ("mcp_fhir_opa_restarts_total", frozenset({("reason", "reload")}))
    return samples(sidecar.scrape()).get(key, 0.0)


def test_sighup_with_a_config_that_does_not_validate_keeps_the_running_keys(sidecar: ServedSidecar, nurse):
    assert sidecar.process is not None
    sidecar.config_path.write_text("server: [not, a, mapping]\n", encoding="utf-8")
    sidecar.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in sidecar.stderr(), timeout=RECOVERY_TIMEOUT_S, what="the refusal")
    assert initialize_status(sidecar, nurse.key) == 200
    assert sidecar.process.poll() is None


def test_a_wrong_backend_base_url_is_not_ready_and_named(tmp_path: Path, fhir_server, nurse, capsys):
    cfg = http_config(tmp_path, fhir_server.base_url.rstrip("/") + "/no-such-base", [nurse])
    with ServedSidecar(tmp_path, cfg) as sidecar:
        status, report = sidecar.readyz()
        assert status == 503 and report["ready"] is False
        assert report["checks"]["opa"] is True and report["checks"]["audit"] is True
        assert report["checks"]["backends"]["testbed"]["ready"] is False
        assert report["checks"]["backends"]["testbed"]["metadata"] is False
        assert main(["status", "--url", sidecar.base_url]) == 1
        out = capsys.readouterr().out
        assert out.startswith("NOT READY") and "backend testbed" in out


def test_a_right_backend_base_url_is_ready_per_backend(sidecar: ServedSidecar):
    status, report = sidecar.readyz()
    assert status == 200
    assert report["checks"]["backends"] == {"testbed": {"ready": True, "metadata": True, "breaker": "closed"}}


def serve_with_a_taken_port(
    tmp_path: Path, fhir_url: str, nurse: Any, key: str
) -> subprocess.CompletedProcess[str]:
    """`serve` as a process, with `server.<key>` set to a port another socket holds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = http_config(tmp_path, fhir_url, [nurse])
        cfg["server"][key] = taken.getsockname()[1]
        path = tmp_path / "mcp-fhir.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MCP_FHIR_")},
            "PYTHONPATH": str(REPO),
        }
        return subprocess.run(
            [sys.executable, "-m", "mcp_fhir.cli.main", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT_S,
            env=env,
            cwd=tmp_path,
            check=False,
        )


def test_serve_with_its_metrics_port_in_use_exits_non_zero_with_one_line_and_no_traceback(
    tmp_path: Path, fhir_server, nurse
):
    done = serve_with_a_taken_port(tmp_path, fhir_server.base_url, nurse, "metrics_port")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert "server.metrics_port" in line and "in use" in line


# --- #18 §5: process collectors and build info ------------------------------------------------------


def test_metrics_carry_the_process_collectors_and_the_build_info(sidecar: ServedSidecar):
    from mcp_fhir._version import __version__
    from mcp_fhir.policy.managed_opa import find_opa, opa_version

    scraped = samples(sidecar.scrape())
    names = {name for name, _ in scraped}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    [labels] = [dict(lbl) for name, lbl in scraped if name == "mcp_fhir_build_info"]
    assert labels["version"] == __version__
    assert labels["opa_version"] == opa_version(find_opa())
    assert labels["policy_revision"].startswith("sha256:")


def test_serve_with_its_http_port_in_use_exits_non_zero_and_names_the_address_without_a_traceback(
    tmp_path: Path, fhir_server, nurse
):
    done = serve_with_a_taken_port(tmp_path, fhir_server.base_url, nurse, "port")
    assert done.returncode == 3
    assert "Traceback" not in done.stderr + done.stdout
    assert "address already in use" in done.stderr and done.stderr.rstrip().endswith("in the log above)")
