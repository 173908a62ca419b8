"""`mcp-fhir serve` over stdio on SIGTERM or SIGINT (#16 §5): a real process, the official MCP client's
stdio transport (both protocol eras), the real OPA (managed by the server) and the real FHIR test bed.

After a call is answered the process gets the signal. It stops reading calls, lets the one in flight
finish, closes the audit trail (sealed with a signed checkpoint), stops its OPA child and exits 0:
`mcp-fhir audit verify` passes with the pinned key, and no record follows the last checkpoint.

The exit status is read through `sh`, which runs the server and writes `$?` to a file: the MCP client's
transport owns (and reaps) the process it spawns, so it cannot report the status itself. A status of
143 or 130 would be a death by the signal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from prometheus_client.parser import text_string_to_metric_families

from tests.integration._ops_harness import wait_for
from tests.testbed import data
from tests.testbed.sidecar import NURSE, REPO, sidecar_config

pytestmark = pytest.mark.integration

ARGS = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
READ_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0
RUN_AND_RECORD_STATUS = '"$0" -m mcp_fhir.cli.main serve --config "$1" --log-level INFO; echo $? > "$2"'


def _config(workdir: Path, fhir_base_url: str) -> tuple[Path, Path, Path]:
    """The config file, the trail and the signing key's public half (to pin)."""
    trail = workdir / "audit" / "audit.jsonl"
    key = workdir / "keys" / "audit-signing.pem"
    cfg = sidecar_config(
        workdir, fhir_base_url, identity=NURSE, audit={"path": str(trail), "signing_key_file": str(key)}
    )
    path = workdir / "mcp-fhir.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path, trail, Path(str(key) + ".pub")


def _server_pid(config_path: Path) -> int:
    """The `python -m mcp_fhir.cli.main serve` process for this config (not the `sh` around it)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-m", b"mcp_fhir.cli.main", b"serve"] and str(config_path).encode() in argv:
            return int(proc.name)
    raise AssertionError("the server process was not found")


def _opa_children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if argv and argv[0].endswith(b"opa"):
                found.append(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reload_restarts(port: int) -> float:
    text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mcp_fhir_opa_restarts_total" and sample.labels.get("reason") == "reload":
                return float(sample.value)
    return 0.0


def _entries(trail: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trail.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("signum", "mode"),
    [(signal.SIGTERM, "auto"), (signal.SIGINT, "legacy")],
    ids=["SIGTERM", "SIGINT-legacy"],
)
async def test_a_signal_over_stdio_seals_the_trail_stops_opa_and_exits_zero(
    tmp_path: Path, fhir_server: Any, signum: signal.Signals, mode: str
) -> None:
    config_path, trail, public_key = _config(tmp_path, fhir_server.base_url)
    status_file = tmp_path / "exit-status"
    params = StdioServerParameters(
        command="/bin/sh",
        args=["-c", RUN_AND_RECORD_STATUS, sys.executable, str(config_path), str(status_file)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w", encoding="utf-8") as errlog:
        async with Client(
            stdio_client(params, errlog=errlog), mode=mode, read_timeout_seconds=READ_TIMEOUT_S
        ) as client:
            result = await client.call_tool("read_patient", ARGS)
            assert not result.is_error, result.content[0].text
            pid = _server_pid(config_path)
            opa = _opa_children(pid)
            assert opa, "the server manages its own OPA"
            os.kill(pid, signum)
            wait_for(status_file.exists, timeout=EXIT_TIMEOUT_S, what="the server to exit")
    stderr = stderr_path.read_text(encoding="utf-8")
    wait_for(lambda: status_file.read_text().strip() != "", timeout=EXIT_TIMEOUT_S, what="the exit status")
    assert status_file.read_text().strip() == "0", stderr[-2000:]
    assert "Traceback" not in stderr
    assert not any(_alive(child) for child in opa)

    entries = _entries(trail)
    assert "checkpoint" in entries[-1]  # nothing after the last signed checkpoint
    records = [e["record"] for e in entries if "record" in e]
    assert [(r["tool"], r["result"]) for r in records] == [("read_patient", "allowed")]
    verify = [sys.executable, "-m", "mcp_fhir.cli.main", "audit", "verify", "--path", str(trail),
              "--public-key", str(public_key), "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["ok"], report["after_last_checkpoint"]) == (True, 0)


async def test_sighup_over_stdio_restarts_the_managed_opa_and_the_session_goes_on(
    tmp_path: Path, fhir_server: Any
) -> None:
    config_path, trail, _ = _config(tmp_path, fhir_server.base_url)
    cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    port = _free_port()
    cfg.setdefault("server", {})["metrics_port"] = port
    config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_fhir.cli.main", "serve", "--config", str(config_path), "--log-level", "INFO"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w", encoding="utf-8") as errlog:
        async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=READ_TIMEOUT_S) as client:
            first = await client.call_tool("read_patient", ARGS)
            assert not first.is_error, first.content[0].text
            pid = _server_pid(config_path)
            before = _opa_children(pid)
            assert before, "the server manages its own OPA"
            os.kill(pid, signal.SIGHUP)
            # the restart counter moves once the new child answers its health check
            wait_for(lambda: _reload_restarts(port) == 1.0, timeout=EXIT_TIMEOUT_S, what="the OPA reload")
            assert set(_opa_children(pid)).isdisjoint(before)
            assert _alive(pid)
            second = await client.call_tool("read_patient", ARGS)
            assert not second.is_error, second.content[0].text
    assert "Traceback" not in stderr_path.read_text(encoding="utf-8")
    records = [e["record"] for e in _entries(trail) if "record" in e]
    assert [(r["tool"], r["result"]) for r in records] == [("read_patient", "allowed")] * 2
