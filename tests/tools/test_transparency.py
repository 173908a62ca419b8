"""Issue #21 (5): what an agent writes carries HL7 AI Transparency labels and an AI-Provenance, checked
against the guide's published examples (tests/data/ai-transparency/SOURCES.md) and the R4B models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.provenance import Provenance

from mcp_fhir.tools.transparency import (
    ClientInfo,
    ai_device,
    ai_provenance,
    label_ai,
    write_transaction,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "ai-transparency"
NOTE = {
    "resourceType": "DocumentReference",
    "status": "current",
    "subject": {"reference": "Patient/pat-au-001"},
    "content": [{"attachment": {"contentType": "text/plain", "data": "Tm90ZQ=="}}],
    "meta": {
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]
    },
}


def example(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def codings(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept.get("coding", [])}


def test_a_written_resource_carries_the_label_of_the_guides_ai_asserted_example_once():
    expected = {(s["system"], s["code"]) for s in example("Observation-f206-meta.json")["meta"]["security"]}
    labelled = label_ai(label_ai(NOTE))
    got = [(s["system"], s["code"]) for s in labelled["meta"]["security"]]
    assert expected <= set(got) and got.count(next(iter(expected))) == 1
    assert ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "N") in got
    assert "meta" in NOTE and len(NOTE["meta"]["security"]) == 1  # the input is not changed


def test_the_provenance_matches_the_guides_ai_authored_example_in_every_constrained_element():
    published = example("Provenance-AI-Contributed.json")
    ours = ai_provenance(
        target="DocumentReference/n1", device="Device/d1", on_behalf_of="dr-smith", decision_id="dec-1"
    )
    assert ours["meta"]["profile"] == published["meta"]["profile"]
    assert codings(ours["reason"][0]) == codings(published["reason"][0])
    assert codings(ours["activity"]) == codings(published["activity"])
    ai_agent = next(a for a in published["agent"] if a["who"]["reference"].startswith("Device/"))
    (agent,) = ours["agent"]
    assert codings(agent["type"]) == codings(ai_agent["type"])
    assert codings(agent["role"][0]) == codings(ai_agent["role"][0])
    assert agent["who"] == {"reference": "Device/d1"}
    assert agent["onBehalfOf"]["identifier"]["value"] == "dr-smith"
    assert ours["policy"] == ["urn:mcp-fhir:decision:dec-1"]
    Provenance.model_validate(ours)


def test_the_agent_device_matches_the_guides_ai_device_example():
    published = example("Device-TheAI.json")
    ours = ai_device("agent-7", ClientInfo(name="claude-code", version="2.1", model="claude-opus"))
    assert ours["meta"]["profile"] == published["meta"]["profile"]
    assert codings(ours["type"]) == codings(published["type"])
    assert ours["extension"][0]["url"] == published["extension"][0]["url"]
    assert ours["identifier"] == [{"system": "urn:mcp-fhir:agent", "value": "agent-7"}]
    assert {"name": "claude-opus", "type": "model-name"} in ours["deviceName"]
    Device.model_validate(ours)


def test_a_device_without_a_declared_model_names_no_model():
    device = ai_device("agent-7")
    assert "deviceName" not in device and "extension" not in device


def test_the_write_is_one_transaction_whose_provenance_points_at_the_resource_and_the_device():
    bundle = write_transaction(
        NOTE,
        agent_id="agent-7",
        on_behalf_of="dr-smith",
        decision_id="dec-1",
        recorded=datetime(2026, 12, 5, tzinfo=UTC),
    )
    Bundle.model_validate(bundle)
    resource, device, provenance = bundle["entry"]
    assert bundle["type"] == "transaction"
    assert resource["resource"]["meta"]["security"][-1]["code"] == "AIAST"
    assert device["request"]["ifNoneExist"] == "identifier=urn:mcp-fhir:agent|agent-7"
    prov = provenance["resource"]
    assert prov["target"] == [{"reference": resource["fullUrl"]}]
    assert prov["agent"][0]["who"] == {"reference": device["fullUrl"]}
    assert prov["recorded"] == "2026-12-05T00:00:00Z"
