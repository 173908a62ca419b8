"""`SidecarServer` in memory, over fakes: listings, the three error shapes, and argument refusal.

No OPA, EHR or disk: the lifespan yields an `AppContext` over `FakePolicyEngine`,
`FakeEHRClient` and an in-memory audit sink, and the official client talks to the server
in-process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_fhir._exceptions import UpstreamUnavailable
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.fake import FakeAuditTrail
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.context import AppContext, IdentityIds
from mcp_fhir.ehr.client import FakeEHRClient
from mcp_fhir.policy.decide import Decider
from mcp_fhir.policy.engine import Decision, FakePolicyEngine
from mcp_fhir.server import INFRA_ERROR, SidecarServer, policy_purposes, register_resources_and_prompts
from mcp_fhir.tools import all_tools

PATIENT: Final = "pat-1"
SECRET_NAME: Final = "Charlotte Maeve Wetherall"
ARGS: Final = {"patient_id": PATIENT, "purpose": "treatment"}
SUBJECT: Final = Subject(id="agent-1", authn="local", claims={"roles": ["r"]}, scopes=("s",))
PATIENT_RESOURCE: Final = {"resourceType": "Patient", "id": PATIENT, "name": [{"text": SECRET_NAME}]}


def allow(_input: Mapping[str, Any]) -> Decision:
    return Decision(allow=True, decision_id="d-allow")


def deny(_input: Mapping[str, Any]) -> Decision:
    return Decision(
        allow=False, reasons=({"code": "ROLE_NOT_PERMITTED", "message": ""},), decision_id="d-deny"
    )


@dataclass
class Fakes:
    engine: FakePolicyEngine
    ehr: FakeEHRClient = field(default_factory=lambda: FakeEHRClient(resources=[dict(PATIENT_RESOURCE)]))
    sink: FakeAuditTrail = field(default_factory=FakeAuditTrail)

    def server(self) -> SidecarServer:
        holder: dict[str, AppContext] = {}

        @asynccontextmanager
        async def lifespan(_server: Any) -> AsyncIterator[AppContext]:
            app = AppContext(
                decider=Decider(self.engine, audit=self.sink.record),
                backends={"fake": self.ehr},
                default_backend="fake",
                idmap=IdentityIds(),
                audit=self.sink,
                local_subject=SUBJECT,
                continuation_key=b"k" * 32,
                enabled_tools=frozenset(CATALOGUE),
                purposes=await policy_purposes(self.engine),
            )
            holder["app"] = app
            yield app

        server = SidecarServer(name="test", lifespan=lifespan)
        for tool in all_tools():
            server.declare(tool)
        register_resources_and_prompts(server, holder)
        return server


def tool_error(result: Any) -> dict[str, Any]:
    assert result.is_error
    return json.loads(result.content[0].text)


async def test_tools_list_shows_only_what_the_policy_makes_visible():
    fakes = Fakes(FakePolicyEngine(allow, visible=frozenset({"read_patient", "search_audit_log"})))
    async with Client(fakes.server()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert names == {"read_patient", "search_audit_log"}


async def test_an_allowed_read_is_audited_before_it_returns():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server()) as client:
        result = await client.call_tool("read_patient", ARGS)
    assert not result.is_error
    assert [(r.result, r.decision_id, r.returned_count) for r in fakes.sink.records] == [
        ("allowed", "d-allow", 1)
    ]


async def test_an_unknown_argument_is_refused_by_name_before_the_policy_or_the_ehr():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server()) as client:
        result = await client.call_tool("read_patient", {**ARGS, "_include": "Patient:link"})
    err = tool_error(result)
    assert (err["code"], err["argument"]) == ("invalid_argument", "_include")
    assert fakes.engine.calls == [] and fakes.ehr.calls == []
    assert [(r.result, r.error_code, r.tool) for r in fakes.sink.records] == [
        ("error", "invalid_argument", "read_patient")
    ]


async def test_an_unknown_argument_with_a_hostile_name_is_not_echoed():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server()) as client:
        result = await client.call_tool("read_patient", {**ARGS, SECRET_NAME: 1})
    err = tool_error(result)
    assert err["argument"] == "arguments"
    assert SECRET_NAME not in result.content[0].text


async def test_an_unknown_tool_is_invalid_params_and_audited():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server(), mode="legacy") as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("no_such_tool", {})
    assert caught.value.error.code == -32602
    assert caught.value.error.data["code"] == "invalid_argument"
    assert [(r.tool, r.error_code) for r in fakes.sink.records] == [("(unknown)", "invalid_argument")]


async def test_a_denial_is_a_tool_error_with_reasons_and_the_decision_id():
    fakes = Fakes(FakePolicyEngine(deny))
    async with Client(fakes.server()) as client:
        result = await client.call_tool("read_patient", ARGS)
    err = tool_error(result)
    assert (err["code"], err["reasons"], err["decision_id"]) == (
        "policy_denied",
        ["ROLE_NOT_PERMITTED"],
        "d-deny",
    )
    assert fakes.ehr.calls == []
    assert [(r.result, r.decision_id) for r in fakes.sink.records] == [("denied", "d-deny")]


async def test_an_upstream_failure_is_an_mcp_error_with_its_stable_code():
    fakes = Fakes(FakePolicyEngine(allow))
    fakes.ehr.fail_with = UpstreamUnavailable("the EHR could not be reached")
    async with Client(fakes.server(), mode="legacy") as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("read_patient", ARGS)
    assert caught.value.error.code == INFRA_ERROR
    assert caught.value.error.data["code"] == "upstream_unavailable"
    assert [(r.result, r.error_code) for r in fakes.sink.records] == [("error", "upstream_unavailable")]


async def test_an_audit_failure_withholds_the_data_as_audit_unavailable():
    fakes = Fakes(FakePolicyEngine(allow))
    fakes.sink.fail = True
    async with Client(fakes.server(), mode="legacy") as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("read_patient", ARGS)
    assert caught.value.error.data["code"] == "audit_unavailable"
    assert SECRET_NAME not in json.dumps(caught.value.error.model_dump(mode="json"))


async def test_an_unexpected_exception_leaves_as_internal_error_without_its_message():
    fakes = Fakes(FakePolicyEngine(allow))

    async def explode(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(f"parser choked on {SECRET_NAME}")

    fakes.ehr.read = explode  # type: ignore[method-assign]
    async with Client(fakes.server()) as client:
        result = await client.call_tool("read_patient", ARGS)
    err = tool_error(result)
    assert err["code"] == "internal_error"
    assert SECRET_NAME not in result.content[0].text and "Traceback" not in result.content[0].text


async def test_an_unknown_prompt_and_a_bad_prompt_argument_are_invalid_params():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server(), mode="legacy") as client:
        with pytest.raises(MCPError) as unknown:
            await client.get_prompt("nope", {"patient_id": PATIENT})
        with pytest.raises(MCPError) as bad:
            await client.get_prompt("discharge_summary", {"patient_id": "../x"})
        with pytest.raises(MCPError) as missing:
            await client.get_prompt("discharge_summary", {})
    assert [e.value.error.code for e in (unknown, bad, missing)] == [-32602, -32602, -32602]
    assert bad.value.error.data["argument"] == "patient_id"


PURPOSES: Final = {
    "treatment": {"access": ["read", "write"], "resource_types": {"Observation": {}, "Patient": {}}},
    "audit": {"description": "Review who accessed what.", "access": ["read"], "resource_types": {}},
}


async def test_the_purpose_parameter_publishes_the_policys_purposes_as_an_enum_with_descriptions():
    engine = FakePolicyEngine(
        allow, visible=frozenset(CATALOGUE), data={"mcp_fhir/config/purposes": PURPOSES}
    )
    async with Client(Fakes(engine).server()) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    purpose = tools["search_observations"].input_schema["properties"]["purpose"]
    [string] = [b for b in purpose["anyOf"] if b.get("type") == "string"]
    assert string["enum"] == ["audit", "treatment"]
    assert "audit: Review who accessed what." in purpose["description"]
    assert "treatment: read/write of Observation, Patient" in purpose["description"]
    assert all(t.input_schema["additionalProperties"] is False for t in tools.values())


async def test_with_no_purposes_in_the_policys_data_the_purpose_parameter_stays_open():
    fakes = Fakes(FakePolicyEngine(allow, visible=frozenset(CATALOGUE)))
    async with Client(fakes.server()) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert "enum" not in json.dumps(tools["read_patient"].input_schema["properties"]["purpose"])


async def test_the_patient_summary_resource_returns_a_denial_as_an_error_not_as_content():
    fakes = Fakes(FakePolicyEngine(deny))
    async with Client(fakes.server(), mode="legacy") as client:
        with pytest.raises(MCPError) as caught:
            await client.read_resource(f"fhir-summary://patient/{PATIENT}")
    assert caught.value.error.data["code"] == "policy_denied"
    assert caught.value.error.data["reasons"] == ["ROLE_NOT_PERMITTED"]
    assert [(r.result, r.tool) for r in fakes.sink.records] == [("denied", "patient_summary")]


async def test_the_patient_summary_resource_returns_the_summary_when_allowed_and_audits_it_once():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server()) as client:
        result = await client.read_resource(f"fhir-summary://patient/{PATIENT}")
    assert result.contents[0].text.startswith(f"### Summary of patient {PATIENT}")
    assert [(r.result, r.tool) for r in fakes.sink.records] == [("allowed", "patient_summary")]


async def test_a_hostile_patient_id_in_the_summary_resource_is_invalid_params():
    fakes = Fakes(FakePolicyEngine(allow))
    async with Client(fakes.server(), mode="legacy") as client:
        with pytest.raises(MCPError) as caught:
            await client.read_resource("fhir-summary://patient/a%20b")
    assert caught.value.error.code == -32602
