"""At start the sidecar reads the policy's purposes from the real OPA and publishes them as the `purpose`
parameter's enum, with descriptions (#18 §5). The policy still decides every call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client

from mcp_fhir import config
from mcp_fhir.server import build_server
from tests.testbed import data
from tests.testbed.sidecar import CLINICIAN, POLICIES, sidecar_config

pytestmark = pytest.mark.integration

PURPOSES_DATA = POLICIES / "mcp_fhir" / "config" / "purposes" / "data.yaml"


async def test_every_tool_with_a_purpose_lists_the_policys_purposes_as_its_enum(
    tmp_path: Path, fhir_server: Any
):
    expected = sorted(yaml.safe_load(PURPOSES_DATA.read_text(encoding="utf-8")))
    settings = config.from_mapping(sidecar_config(tmp_path, fhir_server.base_url, identity=CLINICIAN))
    async with Client(build_server(settings)) as client:
        tools = (await client.list_tools()).tools
        unknown = await client.call_tool(
            "read_patient", {"patient_id": data.AU_PATIENT_ID, "purpose": "marketing"}
        )
    with_purpose = [t for t in tools if "purpose" in t.input_schema["properties"]]
    assert with_purpose
    for tool in with_purpose:
        prop = tool.input_schema["properties"]["purpose"]
        [string] = [b for b in prop["anyOf"] if b.get("type") == "string"]
        assert string["enum"] == expected, tool.name
        assert all(f"{name}:" in prop["description"] for name in expected), tool.name
    # Publishing is not deciding: a purpose outside the enum still reaches the policy, which denies it.
    assert unknown.is_error
    assert json.loads(unknown.content[0].text)["code"] == "policy_denied"
