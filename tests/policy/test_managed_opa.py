"""The embedded OPA child: started on loopback, never outliving the sidecar (even one killed by SIGKILL), and
supervised: a dead child is restarted on the same port with backoff, decisions are denied while it is down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mcp_fhir import metrics
from mcp_fhir.policy.decide import evaluate_failing_closed
from mcp_fhir.policy.managed_opa import ManagedOpa, opa_version, policy_digest
from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GONE_DEADLINE_S = 15.0
POLICIES = REPO / "policies"
RESTART_TIMEOUT_S = 60.0
MAX_DECISIONS = 5000  # bound on the decision loop while OPA is down
DECISION_TIMEOUT_S = 3.0

HOLDER = """
import asyncio, sys
from pathlib import Path
from mcp_fhir.policy.managed_opa import ManagedOpa

async def main():
    opa = ManagedOpa([Path(sys.argv[1])])
    await opa.start()
    print(opa.process.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_the_managed_opa_dies_with_a_sidecar_killed_by_sigkill():
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(REPO / "policies")], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        opa_pid = int(holder.stdout.readline())
        assert alive(opa_pid)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        deadline = time.monotonic() + GONE_DEADLINE_S
        while alive(opa_pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a real condition (the process table), bounded by the deadline
        assert not alive(opa_pid), "the OPA child outlived the killed sidecar"
    finally:
        holder.kill()
        if "opa_pid" in locals() and alive(opa_pid):
            os.kill(opa_pid, signal.SIGKILL)


def _allowed_input() -> dict[str, Any]:
    cases = json.loads((POLICIES / "fixtures" / "decisions.json").read_text(encoding="utf-8"))
    return next(c for c in cases if c["expect"]["allow"] is True and isinstance(c["input"], dict))["input"]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def restarts(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("mcp_fhir_opa_restarts_total", {"reason": reason}) or 0.0


async def wait_until(condition, *, timeout: float) -> None:
    """Poll a real condition (a port, a process) with a bound; the pause is the poll interval, not a sync."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_killed_child_is_restarted_on_its_port_every_decision_meanwhile_is_denied_and_it_is_counted(
    opa_binary: str,
):
    decision_input = _allowed_input()
    before = restarts("exited")
    async with (
        ManagedOpa([POLICIES], binary=opa_binary) as opa,
        OpaPolicyEngine(OpaSettings(url=opa.url, decision_timeout=DECISION_TIMEOUT_S)) as engine,
    ):
        assert (await evaluate_failing_closed(engine, decision_input)).allow
        assert opa.process is not None
        old_pid = opa.process.pid
        opa.process.kill()
        await wait_until(lambda: not listening(opa.port), timeout=GONE_DEADLINE_S)
        while_down = []
        for _ in range(MAX_DECISIONS):
            decision = await evaluate_failing_closed(engine, decision_input)
            if listening(opa.port):
                break
            while_down.append(decision)  # nothing listened on OPA's port for the whole decision
        assert while_down and all(not d.allow for d in while_down)
        assert {c for d in while_down for c in d.reason_codes} == {"opa_unavailable"}
        await opa.wait_restarted(0, RESTART_TIMEOUT_S)
        served = [(await evaluate_failing_closed(engine, decision_input)).allow for _ in range(3)]
        assert served[-1] is True  # the first may meet a pooled connection to the dead child: denied
        assert opa.process is not None and opa.process.pid != old_pid
        assert await engine.healthy()
    assert opa.restarts == 1 and restarts("exited") == before + 1


async def test_a_child_that_cannot_start_is_retried_with_backoff_until_it_can(
    opa_binary: str, tmp_path: Path
):
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    broken = policies / "mcp_fhir" / "zz_broken.rego"
    async with ManagedOpa([policies], binary=opa_binary, backoff_initial=0.05, backoff_max=0.2) as opa:
        assert opa.process is not None
        broken.write_text("package broken\n\nthis is not rego\n", encoding="utf-8")
        opa.process.kill()
        spawned: set[int] = set()

        def failed_twice() -> bool:
            if opa.process is not None:
                spawned.add(opa.process.pid)
            return len(spawned) >= 3  # the killed child and at least two failed restarts

        await wait_until(failed_twice, timeout=RESTART_TIMEOUT_S)
        assert opa.restarts == 0
        broken.unlink()
        await opa.wait_restarted(0, RESTART_TIMEOUT_S)
        async with OpaPolicyEngine(OpaSettings(url=opa.url)) as engine:
            assert await engine.healthy()


async def test_reload_restarts_the_child_at_once_and_counts_it_as_a_reload(opa_binary: str):
    before = restarts("reload")
    async with ManagedOpa([POLICIES], binary=opa_binary, backoff_initial=30.0) as opa:
        assert opa.process is not None
        old_pid = opa.process.pid
        await opa.reload()  # no backoff for a reload: a 30 s backoff would time this out
        assert opa.process is not None and opa.process.pid != old_pid and opa.running
    assert restarts("reload") == before + 1


async def test_stop_during_the_backoff_ends_supervision_and_leaves_no_child(opa_binary: str):
    opa = ManagedOpa([POLICIES], binary=opa_binary, backoff_initial=300.0)
    await opa.start()
    assert opa.process is not None
    proc = opa.process
    proc.kill()
    await wait_until(lambda: proc.poll() is not None, timeout=GONE_DEADLINE_S)
    async with asyncio.timeout(GONE_DEADLINE_S):  # a 300 s backoff must not hold the stop
        await opa.stop()
    assert opa.process is None and not listening(opa.port)


def test_the_opa_version_and_the_policy_digest_are_known_for_build_info(opa_binary: str, tmp_path: Path):
    assert re.fullmatch(r"\d+\.\d+\.\d+", opa_version(opa_binary) or "")
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    digest = policy_digest([policies])
    assert digest is not None and digest == policy_digest([POLICIES])
    (policies / "mcp_fhir" / "authz" / "extra_test.rego").write_text("package x\n", encoding="utf-8")
    assert policy_digest([policies]) == digest  # tests are not served, so they do not change the revision
    (policies / "mcp_fhir" / "authz" / "extra.rego").write_text("package x\n", encoding="utf-8")
    assert policy_digest([policies]) != digest


async def test_the_managed_opa_runs_with_its_status_api_on_and_go_gc_at_gogc_400(
    opa_binary: str, monkeypatch
):
    import aiohttp

    from mcp_fhir.policy.managed_opa import ManagedOpa
    from tests.testbed.sidecar import POLICIES

    monkeypatch.delenv("GOGC", raising=False)
    async with ManagedOpa([POLICIES], binary=opa_binary) as opa:
        assert opa.process is not None
        environ = Path(f"/proc/{opa.process.pid}/environ").read_bytes().split(b"\0")
        assert b"GOGC=400" in environ
        async with aiohttp.ClientSession() as http, http.get(f"{opa.url}/v1/status") as response:
            assert response.status == 200


def test_a_gogc_already_in_the_environment_wins(monkeypatch):
    from mcp_fhir.policy.managed_opa import ManagedOpa

    monkeypatch.setenv("GOGC", "150")
    assert ManagedOpa([REPO / "policies"], binary=sys.executable).environment()["GOGC"] == "150"
    monkeypatch.delenv("GOGC")
    assert ManagedOpa([REPO / "policies"], binary=sys.executable).environment()["GOGC"] == "400"
    assert "GOGC" not in ManagedOpa([REPO / "policies"], binary=sys.executable, gogc=None).environment()
