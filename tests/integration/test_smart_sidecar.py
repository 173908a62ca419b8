"""The sidecar as a SMART Backend Services client of a real, verifying token endpoint in front of the FHIR test bed.

The agent's credential never travels upstream: the EHR sees only the sidecar's own token, asked for with
least privilege. When the EHR grants fewer scopes than asked, the tools that need the missing ones are
hidden from listings and answer `tool_unavailable`, never an obscure upstream 403.
"""

from __future__ import annotations

import json

import httpx2
import pytest
from mcp import Client

from mcp_fhir import config
from mcp_fhir.ehr.keys import public_jwks, signing_key_from_pem
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.asgi import lifespan
from tests.testbed.sidecar import CLINICIAN, sidecar_config
from tests.testbed.token_server import RegisteredClient, make_private_key_pem, start_token_server

pytestmark = pytest.mark.integration


def smart_backend(tmp_path, token_server, pem: bytes) -> dict:
    key_file = tmp_path / "sidecar-rs384.pem"
    key_file.write_bytes(pem)
    return {
        "base_url": token_server.fhir_base_url,
        "smart": {
            "client_id": "sidecar",
            "auth_method": "private_key_jwt",
            "token_url": token_server.token_url,
            "private_key_file": str(key_file),
            "key_id": "sidecar-1",
            "algorithm": "RS384",
            "scope_syntax": "v2",
        },
    }


def registered(pem: bytes) -> RegisteredClient:
    key = signing_key_from_pem(pem, kid="sidecar-1", algorithm="RS384", key="t")
    return RegisteredClient("sidecar", jwks=public_jwks([key]))


async def test_reads_go_upstream_with_the_sidecars_own_token_asked_for_once(tmp_path, fhir_server):
    pem = make_private_key_pem("RS384")
    with start_token_server([registered(pem)], upstream_fhir_url=fhir_server.base_url) as ehr:
        cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN, cache={"enabled": False})
        cfg["backends"]["testbed"] = smart_backend(tmp_path, ehr, pem)
        async with Client(build_server(config.from_mapping(cfg))) as client:
            for _ in range(3):
                result = await client.call_tool(
                    "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
                )
                assert not result.is_error, result.content[0].text
        assert ehr.token_requests == 1
        assert ehr.proxied_requests >= 3  # each read went upstream, on the one token


async def test_tools_whose_scopes_the_ehr_withheld_are_hidden_and_answer_tool_unavailable(
    tmp_path, fhir_server
):
    pem = make_private_key_pem("RS384")
    granted = "system/Patient.r system/Observation.rs"
    with start_token_server(
        [registered(pem)], upstream_fhir_url=fhir_server.base_url, granted_scope=granted
    ) as ehr:
        cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN)
        cfg["backends"]["testbed"] = smart_backend(tmp_path, ehr, pem)
        async with Client(build_server(config.from_mapping(cfg))) as client:
            listed = {t.name for t in (await client.list_tools()).tools}
            assert "search_observations" in listed
            assert "search_medication_statements" not in listed
            result = await client.call_tool(
                "search_medication_statements", {"patient_id": data.AU_PATIENT_ID, "purpose": "treatment"}
            )
    assert result.is_error
    err = json.loads(result.content[0].text)
    assert err["code"] == "tool_unavailable"
    assert "system/MedicationStatement.rs" in err["missing_scopes"]
    records = [
        json.loads(line)["record"]
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if "record" in json.loads(line)
    ]
    assert any(
        r["tool"] == "search_medication_statements" and r["error_code"] == "tool_unavailable" for r in records
    )


async def test_a_lab_only_configuration_asks_the_ehr_for_the_observation_scope_only(tmp_path, fhir_server):
    pem = make_private_key_pem("RS384")
    with start_token_server([registered(pem)], upstream_fhir_url=fhir_server.base_url) as ehr:
        cfg = sidecar_config(
            tmp_path, fhir_server.base_url, identity=CLINICIAN, tools=["search_observations"]
        )
        cfg["backends"]["testbed"] = smart_backend(tmp_path, ehr, pem)
        async with Client(build_server(config.from_mapping(cfg))) as client:
            assert {t.name for t in (await client.list_tools()).tools} == {"search_observations"}
        assert ehr.requested_scopes == [["system/Observation.rs"]]


async def test_the_sidecars_public_jwks_is_served_for_the_ehr_to_register(tmp_path, fhir_server):
    from mcp_fhir.http_app import build_http_app

    pem = make_private_key_pem("RS384")
    with start_token_server([registered(pem)], upstream_fhir_url=fhir_server.base_url) as ehr:
        cfg = sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN, transport="http")
        cfg["auth"] = {"api_keys": [{"id": "k", "hash": "sha256:" + "0" * 64}]}
        cfg["backends"]["testbed"] = smart_backend(tmp_path, ehr, pem)
        settings = config.from_mapping(cfg)
        app = build_http_app(settings, build_server(settings))
        transport = httpx2.ASGITransport(app=app)
        async with lifespan(app):
            async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765") as http:
                jwks = (await http.get("/.well-known/jwks.json")).json()
    [key] = jwks["keys"]
    assert key["kid"] == "sidecar-1" and key["alg"] == "RS384"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
