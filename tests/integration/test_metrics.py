"""Every metric of issue #9, scraped from a real `mcp-fhir serve` process and parsed as Prometheus text.

The sidecar runs over HTTP with two API keys (a nurse and a clinician), in front of the FHIR test bed
behind the SMART test token endpoint (tests/testbed/token_server.py), with a rate limit of 12 requests a
minute (a bucket of one, a token every 5 s) so that of two concurrent uncached EHR requests one waits
and one is rejected. The test scrapes once before and once after a fixed sequence of allowed, denied
and erroring calls, and checks how each series moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration._ops_harness import (
    ApiKeyIdentity,
    ServedSidecar,
    http_config,
    replace_dir_with_file,
    restore_dir,
    wait_for,
)
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, NURSE
from tests.testbed.token_server import RegisteredClient, TokenServer, start_token_server

pytestmark = pytest.mark.integration

SMART_SECRET = "smart-secret-for-metrics-test-7c1e"
SECRET_ENV = "MCP_FHIR_TEST_SMART_SECRET"
RATE_LIMIT_PER_MINUTE = 12  # one token every 5 s (bucket of 1), the limiter's maximum wait

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

FAMILIES = (
    "mcp_fhir_decisions",
    "mcp_fhir_decision_seconds",
    "mcp_fhir_tool_calls",
    "mcp_fhir_upstream_seconds",
    "mcp_fhir_upstream_responses",
    "mcp_fhir_cache",
    "mcp_fhir_rate_limit_wait_seconds",
    "mcp_fhir_rate_limit_rejections",
    "mcp_fhir_circuit_state",
    "mcp_fhir_token_refreshes",
    "mcp_fhir_audit_write_seconds",
    "mcp_fhir_audit_failures",
    "mcp_fhir_shadow_divergences",
)


def parse(text: str) -> tuple[set[str], Samples]:
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture
def token_server(fhir_server) -> Iterator[TokenServer]:
    clients = [RegisteredClient("mcp-fhir-metrics", secret=SMART_SECRET)]
    with start_token_server(clients, upstream_fhir_url=fhir_server.base_url) as server:
        yield server


@pytest.fixture
def nurse() -> ApiKeyIdentity:
    return ApiKeyIdentity(NURSE)


@pytest.fixture
def clinician() -> ApiKeyIdentity:
    return ApiKeyIdentity(CLINICIAN)


@pytest.fixture
def sidecar(tmp_path: Path, token_server: TokenServer, nurse, clinician) -> Iterator[ServedSidecar]:
    cfg = http_config(
        tmp_path,
        token_server.fhir_base_url,
        [nurse, clinician],
        opa={"shadow_policies": str(Path(__file__).resolve().parents[2] / "policies")},
    )
    cfg["backends"]["testbed"].update(
        rate_limit_per_minute=RATE_LIMIT_PER_MINUTE,
        smart={
            "client_id": "mcp-fhir-metrics",
            "auth_method": "client_secret_basic",
            "token_url": token_server.token_url,
            "client_secret_env": SECRET_ENV,
        },
    )
    with ServedSidecar(tmp_path, cfg, env={SECRET_ENV: SMART_SECRET}) as served:
        yield served


async def test_every_metric_is_exported_and_moves_with_allowed_denied_and_erroring_calls(
    sidecar: ServedSidecar, nurse, clinician, tmp_path
):
    families, before = parse(sidecar.scrape())
    assert set(FAMILIES) <= families, sorted(set(FAMILIES) - families)
    args = {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}

    async with sidecar.client(nurse.key) as client:
        first = await client.call_tool("read_patient", args)  # EHR request: cache miss, limiter slot
        second = await client.call_tool("read_patient", args)  # cache hit
        denied = await client.call_tool("search_medication_statements", args)
    async with sidecar.client(clinician.key) as client:
        # Two uncached EHR requests at once: one waits for the next slot (< 5 s), the other would wait
        # longer than the limiter's bound and is rejected.
        searches = await asyncio.gather(
            *(
                client.call_tool("search_observations", {"patient_id": patient, "purpose": "treatment"})
                for patient in (data.SERIES_PATIENT_ID, "pat-us-healthy")
            )
        )
    assert not first.is_error and not second.is_error, first.content[0].text
    assert denied.is_error and '"policy_denied"' in denied.content[0].text
    limited = [r for r in searches if r.is_error]
    assert len(limited) == 1 and '"upstream_rate_limited"' in limited[0].content[0].text

    _, after = parse(sidecar.scrape())

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("mcp_fhir_decisions_total", result="allow") == 4
    assert moved("mcp_fhir_decisions_total", result="deny") >= 1
    assert {dict(ls)["reason"] for (n, ls) in after if n == "mcp_fhir_decisions_total"} >= {"none"}
    # The histogram times every OPA evaluation, the shadow policy's included (4 active + 4 shadow here).
    assert moved("mcp_fhir_decision_seconds_count") >= 4
    assert moved("mcp_fhir_tool_calls_total", tool="read_patient", result="allowed") == 2
    assert moved("mcp_fhir_tool_calls_total", tool="search_medication_statements", result="denied") == 1
    assert moved("mcp_fhir_tool_calls_total", tool="search_observations", result="error") == 1
    assert moved("mcp_fhir_tool_calls_total", tool="search_observations", result="allowed") == 1
    assert moved("mcp_fhir_upstream_seconds_count", backend="testbed") == 2
    assert moved("mcp_fhir_upstream_responses_total", backend="testbed", status="200") == 2
    assert moved("mcp_fhir_cache_total", backend="testbed", outcome="hit") == 1
    assert moved("mcp_fhir_cache_total", backend="testbed", outcome="miss") >= 1
    assert moved("mcp_fhir_rate_limit_wait_seconds_count", backend="testbed") == 2
    assert moved("mcp_fhir_rate_limit_wait_seconds_sum", backend="testbed") > 0  # someone really waited
    assert moved("mcp_fhir_rate_limit_rejections_total", backend="testbed") == 1
    assert value(after, "mcp_fhir_circuit_state", backend="testbed") == 0
    assert total(after, "mcp_fhir_token_refreshes_total", backend="testbed") >= 1
    assert moved("mcp_fhir_audit_write_seconds_count") >= 4
    assert moved("mcp_fhir_audit_failures_total") == 0

    # The audit sink breaks: the next call fails closed, and the failure is counted.
    audit_dir = tmp_path / "audit"
    aside = replace_dir_with_file(audit_dir)
    try:
        async with sidecar.client(nurse.key) as client:
            with pytest.raises(Exception, match="audit"):
                result = await client.call_tool("read_patient", args)
                if result.is_error:  # pragma: no cover - shape depends on where the write failed
                    raise RuntimeError(result.content[0].text)
    finally:
        restore_dir(audit_dir, aside)
    _, broken = parse(sidecar.scrape())
    assert total(broken, "mcp_fhir_audit_failures_total") - total(after, "mcp_fhir_audit_failures_total") >= 1
    wait_for(lambda: sidecar.readyz()[0] == 200, timeout=30, what="readiness after the audit sink recovered")


async def test_metric_labels_carry_no_patient_ids_or_phi(sidecar: ServedSidecar, nurse):
    async with sidecar.client(nurse.key) as client:
        for patient in (data.AU_PATIENT_ID, "pat-us-diabetes", "no-such-patient"):
            await client.call_tool("read_patient", {"patient_id": patient, "purpose": "treatment"})
    text = sidecar.scrape()
    _, samples = parse(text)
    label_values = {v for (_, ls) in samples for _, v in ls}
    for patient in data.PATIENTS:
        assert patient not in text
    assert "no-such-patient" not in text
    for phi in data.KNOWN_PHI:
        assert phi not in label_values
