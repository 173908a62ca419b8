"""Readiness of a real `mcp-fhir serve`: false when OPA stops or the audit sink breaks, true when they recover.

OPA is a `ManagedOpa` this test owns (the sidecar points `opa.url` at it). The audit sink is broken in a
way that stops root too: its directory is moved aside and a plain file is put at its path.
`mcp-fhir status --url` reports the same thing for a person, with exit status 0 (ready) or 1 (not ready).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcp_fhir.cli.main import main
from mcp_fhir.policy.managed_opa import ManagedOpa
from tests.integration._ops_harness import (
    ApiKeyIdentity,
    ServedSidecar,
    http_config,
    replace_dir_with_file,
    restore_dir,
    wait_for,
)
from tests.testbed.sidecar import NURSE, POLICIES

pytestmark = pytest.mark.integration

RECOVERY_TIMEOUT = 30.0


@pytest.fixture
async def opa() -> AsyncIterator[ManagedOpa]:
    managed = ManagedOpa([POLICIES])
    await managed.start()
    try:
        yield managed
    finally:
        await managed.stop()


@pytest.fixture
def sidecar(tmp_path: Path, fhir_server, opa: ManagedOpa):
    cfg = http_config(tmp_path, fhir_server.base_url, [ApiKeyIdentity(NURSE)], opa={"url": opa.url})
    with ServedSidecar(tmp_path, cfg) as served:
        yield served


def status_of(sidecar: ServedSidecar, capsys) -> tuple[int, str]:
    code = main(["status", "--url", sidecar.base_url])
    return code, capsys.readouterr().out


async def test_readiness_turns_false_when_opa_stops_and_true_when_it_comes_back(sidecar, opa, capsys):
    status, report = sidecar.readyz()
    assert (status, report["ready"], report["checks"]["opa"]) == (200, True, True)
    code, out = status_of(sidecar, capsys)
    assert code == 0 and out.startswith("READY")
    await opa.stop()
    status, report = sidecar.readyz()
    assert (status, report["ready"], report["checks"]["opa"]) == (503, False, False)
    code, out = status_of(sidecar, capsys)
    assert code == 1 and out.startswith("NOT READY")
    revived = ManagedOpa([POLICIES], port=opa.port)
    await revived.start()
    try:
        wait_for(
            lambda: sidecar.readyz()[0] == 200, timeout=RECOVERY_TIMEOUT, what="readiness after OPA restarted"
        )
        code, out = status_of(sidecar, capsys)
        assert code == 0 and out.startswith("READY")
    finally:
        await revived.stop()


def test_readiness_turns_false_when_the_audit_sink_breaks_and_true_when_it_is_restored(sidecar, tmp_path):
    assert sidecar.readyz()[0] == 200
    audit_dir = tmp_path / "audit"
    aside = replace_dir_with_file(audit_dir)
    try:
        status, report = sidecar.readyz()
        assert (status, report["checks"]["audit"], report["checks"]["opa"]) == (503, False, True)
    finally:
        restore_dir(audit_dir, aside)
    wait_for(
        lambda: sidecar.readyz()[0] == 200, timeout=RECOVERY_TIMEOUT, what="readiness after audit recovered"
    )


def test_liveness_stays_true_while_readiness_is_false(sidecar, tmp_path):
    aside = replace_dir_with_file(tmp_path / "audit")
    try:
        assert sidecar.readyz()[0] == 503
        assert sidecar._live()
    finally:
        restore_dir(tmp_path / "audit", aside)


def test_status_reports_an_unreachable_server_with_exit_status_2(capsys):
    from mcp_fhir.policy.managed_opa import free_port

    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err.startswith("not reachable")  # an error: on stderr, like every CLI error
