"""create_clinical_note end to end (issue #21 §5, §6): the official MCP client and its elicitation
callback, the real OPA with the shipped policy (whose data asks a person to confirm this tool), and the
FHIR test bed, which receives one transaction: the note labelled AIAST, the agent's AI-Device and an
AI-Provenance. Accept writes; decline, cancel and a client without elicitation write nothing.

`mode="legacy"` (protocol 2025-11-25) asks mid-call with `elicitation/create`; the client's default
(`auto`, 2026-07-28) gets an `InputRequiredResult` and retries with the answer, which the client's
elicitation callback gives in both modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, types

from mcp_fhir import config
from mcp_fhir.server import build_server
from mcp_fhir.tools.notes import IDEMPOTENCY_SYSTEM
from mcp_fhir.tools.transparency import AI_PROVENANCE_PROFILE, OBSERVATION_VALUE
from tests.adversarial.conftest import audit_records, tool_error
from tests.adversarial.conftest import opa_url as opa_url  # the session's real OPA (a fixture)
from tests.testbed import data
from tests.testbed.sidecar import sidecar_config

pytestmark = pytest.mark.integration

PATIENT = data.AU_INJECTION_PATIENT_ID
AUTHOR = {
    "id": "agent-note-writer",
    "claims": {"roles": ["clinician"], "sub": "agent-note-writer"},
    "scopes": ["user/*.rs", "user/DocumentReference.c"],
}
CLIENT = types.Implementation(name="ward-assistant", version="2.1")


def _answer(action: str, confirm: bool | None = None):
    asked: list[str] = []

    async def callback(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        content = {"confirm": confirm} if confirm is not None else None
        return types.ElicitResult(action=action, content=content)

    return callback, asked


def _args(key: str) -> dict[str, Any]:
    return {
        "patient_id": PATIENT,
        "title": "Ward round",
        "text": "Reviewed on the ward round; plan unchanged.",
        "idempotency_key": key,
        "purpose": "treatment",
    }


def _search(base: str, path: str) -> list[dict[str, Any]]:
    body = httpx2.get(f"{base}/{path}", headers={"Accept": "application/fhir+json"}, timeout=10).json()
    return [e["resource"] for e in body.get("entry", [])]


def _notes(base: str, key: str) -> list[dict[str, Any]]:
    return _search(base, f"DocumentReference?identifier={IDEMPOTENCY_SYSTEM}|{key}")


async def _write(
    workdir: Path, fhir_server: Any, opa: str, key: str, mode: str = "legacy", **client_kw: Any
) -> Any:
    settings = config.from_mapping(
        sidecar_config(workdir, fhir_server.base_url, opa_url=opa, identity=AUTHOR)
    )
    async with Client(build_server(settings), client_info=CLIENT, mode=mode, **client_kw) as client:
        return await client.call_tool("create_clinical_note", _args(key))


async def test_an_accepted_confirmation_writes_the_note_with_aiast_device_and_provenance(
    tmp_path, fhir_server, opa_url
):
    key = "wire-accept-0001"
    callback, asked = _answer("accept", True)
    result = await _write(tmp_path, fhir_server, opa_url, key, elicitation_callback=callback)
    assert not result.is_error, result.content[0].text
    assert len(asked) == 1 and "create_clinical_note" in asked[0]
    [note] = _notes(fhir_server.base_url, key)
    assert any(s["system"] == OBSERVATION_VALUE and s["code"] == "AIAST" for s in note["meta"]["security"])
    assert not any(t.get("system") == "urn:mcp-fhir:provenance" for t in note["meta"].get("tag", []))
    [provenance] = _search(fhir_server.base_url, f"Provenance?target=DocumentReference/{note['id']}")
    assert AI_PROVENANCE_PROFILE in provenance["meta"]["profile"]
    [record] = audit_records(tmp_path)
    assert provenance["policy"] == [f"urn:mcp-fhir:decision:{record['decision_id']}"]
    device_ref = provenance["agent"][0]["who"]["reference"]
    device = httpx2.get(f"{fhir_server.base_url}/{device_ref}", timeout=10).json()
    assert device["identifier"][0]["value"] == AUTHOR["id"]
    assert {"name": "ward-assistant", "type": "user-friendly-name"} in device["deviceName"]
    assert record["result"] == "allowed"
    assert record["extra"]["confirmation"] == {"outcome": "accepted", "prompt_code": "confirm_clinical_note"}


@pytest.mark.parametrize(
    ("action", "confirm", "outcome"),
    [("decline", None, "declined"), ("cancel", None, "cancelled"), ("accept", False, "declined")],
)
async def test_anything_but_an_explicit_accept_writes_nothing_and_is_audited(
    tmp_path, fhir_server, opa_url, action: str, confirm: bool | None, outcome: str
):
    key = f"wire-{action}-{outcome}-{'x' if confirm is None else 'f'}"
    callback, asked = _answer(action, confirm)
    err = tool_error(await _write(tmp_path, fhir_server, opa_url, key, elicitation_callback=callback))
    assert err["code"] == "confirmation_declined"
    assert len(asked) == 1
    assert _notes(fhir_server.base_url, key) == []
    [record] = audit_records(tmp_path)
    assert (record["result"], record["error_code"]) == ("error", "confirmation_declined")
    assert record["extra"]["confirmation"]["outcome"] == outcome


async def test_a_client_without_elicitation_gets_confirmation_required_and_nothing_is_written(
    tmp_path, fhir_server, opa_url
):
    key = "wire-no-elicitation"
    before = len(_search(fhir_server.base_url, f"DocumentReference?subject=Patient/{PATIENT}&_count=200"))
    err = tool_error(await _write(tmp_path, fhir_server, opa_url, key))
    assert err["code"] == "confirmation_required"
    assert _notes(fhir_server.base_url, key) == []
    after = len(_search(fhir_server.base_url, f"DocumentReference?subject=Patient/{PATIENT}&_count=200"))
    assert after == before
    [record] = audit_records(tmp_path)
    assert record["extra"]["confirmation"] == {
        "outcome": "unsupported",
        "prompt_code": "confirm_clinical_note",
    }


@pytest.mark.parametrize(("action", "confirm"), [("accept", True), ("decline", None)])
async def test_on_the_2026_protocol_the_question_comes_back_as_input_required_and_the_retry_decides(
    tmp_path, fhir_server, opa_url, action: str, confirm: bool | None
):
    key = f"wire-auto-{action}"
    callback, asked = _answer(action, confirm)
    result = await _write(tmp_path, fhir_server, opa_url, key, mode="auto", elicitation_callback=callback)
    assert len(asked) == 1
    records = audit_records(tmp_path)
    assert records[0]["extra"]["confirmation"]["outcome"] == "requested"  # round one: asked, nothing written
    if action == "accept":
        assert not result.is_error, result.content[0].text
        assert len(_notes(fhir_server.base_url, key)) == 1
        assert records[-1]["extra"]["confirmation"]["outcome"] == "accepted"
    else:
        assert tool_error(result)["code"] == "confirmation_declined"
        assert _notes(fhir_server.base_url, key) == []
        assert records[-1]["extra"]["confirmation"]["outcome"] == "declined"


async def test_on_the_2026_protocol_a_client_without_elicitation_gets_confirmation_required(
    tmp_path, fhir_server, opa_url
):
    key = "wire-auto-none"
    err = tool_error(await _write(tmp_path, fhir_server, opa_url, key, mode="auto"))
    assert err["code"] == "confirmation_required"
    assert _notes(fhir_server.base_url, key) == []
