"""The pooled transport: fhirpy's queries go over one keep-alive session, and HTTP failures are translated."""

import pytest

from mcp_fhir.ehr.client import FhirEHRClient
from mcp_fhir.ehr.transport import build_http_client
from tests.testbed import data
from tests.testbed.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration


async def test_many_fhirpy_requests_share_one_reused_connection(fhir_server):
    origin = fhir_server.base_url.rsplit("/fhir/", 1)[0]
    async with FaultProxy(origin) as proxy:
        client = FhirEHRClient("testbed", proxy.url + "/fhir/R4", http=build_http_client())
        try:
            for _ in range(20):
                result = await client.read("Patient", data.AU_PATIENT_ID, patient=data.AU_PATIENT_ID)
                assert result.resources[0]["id"] == data.AU_PATIENT_ID
        finally:
            await client.close()
    assert proxy.requests_forwarded == 20
    assert proxy.connections_accepted == 1


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault.status(500), "upstream_unavailable"),
        (Fault.status(404), "resource_not_found"),
        (Fault.status(401), "upstream_auth_failed"),
        (Fault.status(429, headers={"Retry-After": "1"}), "upstream_rate_limited"),
        (Fault.garbage(), "upstream_bad_response"),
        (Fault.reset(), "upstream_unavailable"),
        (Fault.json({"resourceType": "Observation"}), "upstream_bad_response"),
    ],
)
async def test_each_upstream_failure_becomes_one_typed_error(fhir_server, fault, code):
    origin = fhir_server.base_url.rsplit("/fhir/", 1)[0]
    async with FaultProxy(origin) as proxy:
        proxy.set_fault(fault)
        client = FhirEHRClient("testbed", proxy.url + "/fhir/R4", http=build_http_client())
        try:
            with pytest.raises(Exception) as err:
                await client.read("Patient", data.AU_PATIENT_ID, patient=data.AU_PATIENT_ID)
        finally:
            await client.close()
    assert getattr(err.value, "code", None) == code
