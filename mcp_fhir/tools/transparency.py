"""AI transparency on everything an agent writes, after HL7's *AI Transparency on FHIR* (STU1).

Every resource written through the sidecar is labelled `AIAST` ("Artificial Intelligence asserted",
`http://terminology.hl7.org/CodeSystem/v3-ObservationValue`) in `meta.security`, and travels in one FHIR
transaction with:

* a `Device` for the agent (profile AI-Device: type `Artificial-Intelligence`, the agent's id as its
  identifier, the model it declared in its MCP client info as `deviceName`/`version`), and
* a `Provenance` (profile AI-Provenance): target the written resource, reason `AIAST`, activity CREATE,
  the agent as the author (a reference to that Device, role `Artificial-Intelligence`), the person it acted
  for as `onBehalfOf`, and the policy decision that allowed the write as `policy`.

Where a backend cannot take a transaction, `write_plan` still labels the resource; the Provenance is then
written after it (the caller decides, from the backend's capabilities).

Hand-written on purpose: the guide publishes profiles, not a library; these are plain dictionaries.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "AIAST",
    "AI_DEVICE_PROFILE",
    "AI_PROVENANCE_PROFILE",
    "ClientInfo",
    "ai_device",
    "ai_provenance",
    "label_ai",
    "write_transaction",
]

OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AIAST = {"system": OBSERVATION_VALUE, "code": "AIAST", "display": "Artificial Intelligence asserted"}
IG = "http://hl7.org/fhir/uv/aitransparency"
AI_PROVENANCE_PROFILE = f"{IG}/StructureDefinition/AI-Provenance"
AI_DEVICE_PROFILE = f"{IG}/StructureDefinition/AI-Device"
AI_DEVICE_TYPE = {
    "system": f"{IG}/CodeSystem/AIdeviceTypeCS",
    "code": "Artificial-Intelligence",
    "display": "All kinds of Artificial Intelligence",
}
AI_KIND_EXTENSION = f"{IG}/StructureDefinition/aitransparency.AIKind"
LLM_KIND = {"system": f"{IG}/CodeSystem/AIdeviceTypeCS", "code": "Large-Language-Models"}
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
AGENT_ID_SYSTEM = "urn:mcp-fhir:agent"
PERSON_ID_SYSTEM = "urn:mcp-fhir:on-behalf-of"
DECISION_URN = "urn:mcp-fhir:decision:"


class ClientInfo(dict[str, str]):
    """What the agent declared of itself in MCP `clientInfo` (`name`, `version`), and a model if it named one."""


def label_ai(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy of `resource` with `AIAST` in `meta.security` (once)."""
    out = copy.deepcopy(resource)
    meta = out.setdefault("meta", {})
    security = meta.setdefault("security", [])
    if not any(s.get("system") == OBSERVATION_VALUE and s.get("code") == "AIAST" for s in security):
        security.append(dict(AIAST))
    return out


def ai_device(agent_id: str, client: ClientInfo | None = None) -> dict[str, Any]:
    """The agent as an AI-Device: its id as identifier; its declared model as `deviceName` and `version`."""
    client = client or ClientInfo()
    device: dict[str, Any] = {
        "resourceType": "Device",
        "meta": {"profile": [AI_DEVICE_PROFILE], "security": [dict(AIAST)]},
        "identifier": [{"system": AGENT_ID_SYSTEM, "value": agent_id}],
        "type": {"coding": [dict(AI_DEVICE_TYPE)]},
    }
    if client.get("model"):
        device["extension"] = [
            {"url": AI_KIND_EXTENSION, "valueCodeableConcept": {"coding": [dict(LLM_KIND)]}}
        ]
        device["deviceName"] = [{"name": client["model"], "type": "model-name"}]
    if client.get("name"):
        device.setdefault("deviceName", []).append({"name": client["name"], "type": "user-friendly-name"})
    if client.get("version"):
        device["version"] = [{"value": client["version"]}]
    return device


def ai_provenance(
    *,
    target: str,
    device: str,
    on_behalf_of: str | None,
    decision_id: str | None,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """An AI-Provenance for one written resource (`target` and `device` are references or urn:uuid)."""
    when = (recorded or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": PARTICIPANT, "code": "author", "display": "Author"}]},
        "role": [{"coding": [dict(AI_DEVICE_TYPE)]}],
        "who": {"reference": device},
    }
    if on_behalf_of:
        agent["onBehalfOf"] = {"identifier": {"system": PERSON_ID_SYSTEM, "value": on_behalf_of}}
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "meta": {"profile": [AI_PROVENANCE_PROFILE]},
        "target": [{"reference": target}],
        "occurredDateTime": when,
        "recorded": when,
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "reason": [{"coding": [dict(AIAST)]}],
        "agent": [agent],
    }
    if decision_id:
        provenance["policy"] = [DECISION_URN + decision_id]
    return provenance


def write_transaction(
    resource: dict[str, Any],
    *,
    agent_id: str,
    on_behalf_of: str | None,
    decision_id: str | None,
    client: ClientInfo | None = None,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """One transaction Bundle: the labelled resource, the agent's Device and the Provenance linking them."""
    ids = {k: f"urn:uuid:{uuid.uuid4()}" for k in ("resource", "device", "provenance")}
    rtype = resource["resourceType"]
    device_search = f"identifier={AGENT_ID_SYSTEM}|{agent_id}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": ids["resource"],
                "resource": label_ai(resource),
                "request": {"method": "POST", "url": rtype},
            },
            {
                "fullUrl": ids["device"],
                "resource": ai_device(agent_id, client),
                # one Device per agent: created the first time, found by its identifier after that
                "request": {"method": "POST", "url": "Device", "ifNoneExist": device_search},
            },
            {
                "fullUrl": ids["provenance"],
                "resource": ai_provenance(
                    target=ids["resource"],
                    device=ids["device"],
                    on_behalf_of=on_behalf_of,
                    decision_id=decision_id,
                    recorded=recorded,
                ),
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
