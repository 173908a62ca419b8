"""The embedded OPA child: started on loopback, and never outliving the sidecar, even one killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GONE_DEADLINE_S = 15.0

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
