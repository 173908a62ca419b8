"""Audit records → FHIR R4 AuditEvent, following IHE Basic Audit Log Patterns (BALP).

The output is plain FHIR JSON (dicts), as a ``collection`` Bundle or as NDJSON. The tests
validate it with ``fhir.resources.R4B.auditevent.AuditEvent``: R4B did not change AuditEvent,
so a valid R4B AuditEvent is a valid R4 one.

Mapping:
* ``type``: ``rest`` (audit-event-type) for tool calls; DICOM 110113 *Security Alert* for
  ``alert`` records; 110114 *User Authentication* for ``auth_failure``; ``shadow_divergence``
  uses the local code system ``urn:mcp-fhir:audit-kind``.
* ``subtype``: the FHIR interaction (restful-interaction: read, vread, search-type, create, ...);
  ``action``: R for reads, E for searches (BALP), C/U/D for writes.
* ``outcome``: 0 allowed, 4 (minor failure) denied, 8 (serious failure) error; ``outcomeDesc``
  lists the reason codes and the error code.
* ``purposeOfEvent``: the purpose mapped to v3-ActReason where a mapping is known (see
  ``PURPOSE_OF_USE``; pass your own map to override), always with the raw purpose as ``text``.
* ``agent``: the AI agent (DICOM 110153 Source Role ID, ``requestor=true``, ``who.identifier``);
  the human it acts for, if any (``humanuser``, ``requestor=true``, as BALP's user agent);
  and the sidecar as the server agent (110152 Destination Role ID, ``requestor=false``).
* ``source.observer``: the sidecar (its writer id); source type 4, Application Server.
* ``entity``: the patient (``Patient/<canonical id>``, type 1 Person, role 1 Patient); the query
  (type 2 System Object, role 24 Query, ``query`` = base64 of ``Type?k=v&...``, sorted); and the
  policy decision (``what.identifier`` system ``urn:mcp-fhir:opa-decision-id``) with details:
  policy revision, reason codes, counts, cache, sensitivity, scopes, break-glass reason.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml

from mcp_fhir.audit.record import AuditRecord

__all__ = ["PURPOSE_OF_USE", "to_audit_event", "to_bundle", "to_ndjson"]

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
SECURITY_ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
AGENT_SYSTEM = "urn:mcp-fhir:agent"
USER_SYSTEM = "urn:mcp-fhir:user"
WRITER_SYSTEM = "urn:mcp-fhir:audit-writer"
DECISION_SYSTEM = "urn:mcp-fhir:opa-decision-id"
KIND_SYSTEM = "urn:mcp-fhir:audit-kind"

#: purpose → v3-ActReason code, from mcp_fhir/data/purpose_of_use.yaml. Export only; nothing decides by it.
PURPOSE_OF_USE: dict[str, str] = {
    str(k): str(v)
    for k, v in (
        yaml.safe_load((Path(__file__).parents[1] / "data" / "purpose_of_use.yaml").read_text()) or {}
    ).items()
}

_ACTIONS = {
    "read": "R", "vread": "R", "history-instance": "R", "history-type": "R",
    "search-type": "E", "search-system": "E", "search": "E", "search-compartment": "E",
    "create": "C", "update": "U", "patch": "U", "delete": "D", "operation": "E",
}  # fmt: skip
_OUTCOMES = {"allowed": "0", "denied": "4", "error": "8"}
_ID_SAFE = re.compile(r"[^A-Za-z0-9.-]")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _event_type(kind: str) -> dict[str, str]:
    if kind == "alert":
        return _coding(DCM, "110113", "Security Alert")
    if kind == "auth_failure":
        return _coding(DCM, "110114", "User Authentication")
    if kind == "shadow_divergence":
        return _coding(KIND_SYSTEM, "shadow_divergence", "Shadow policy divergence")
    return _coding(AUDIT_EVENT_TYPE, "rest", "RESTful Operation")


def _query_string(resource_type: str | None, params: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    for key in sorted(params):
        value = params[key]
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((key, v if isinstance(v, str) else json.dumps(v)) for v in values)
    return f"{resource_type or ''}?{urlencode(pairs)}"


def _detail(kind: str, value: Any) -> dict[str, str]:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return {"type": kind, "valueString": text}


def to_audit_event(
    record: AuditRecord | Mapping[str, Any],
    *,
    seq: int | None = None,
    writer: str = "mcp-fhir",
    purpose_map: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One FHIR R4 AuditEvent (as a dict) for one audit record."""
    r = record.to_dict() if isinstance(record, AuditRecord) else dict(record)
    if seq is None and isinstance(r.get("seq"), int):
        seq = r["seq"]
    kind = str(r.get("kind") or "access")
    operation = r.get("operation")
    event: dict[str, Any] = {"resourceType": "AuditEvent"}
    if seq is not None:
        event["id"] = _ID_SAFE.sub("-", f"{writer}-{seq}")[-64:].lstrip("-.") or f"seq-{seq}"
    event["type"] = _event_type(kind)
    if operation:
        event["subtype"] = [_coding(RESTFUL_INTERACTION, str(operation))]
        if operation in _ACTIONS:
            event["action"] = _ACTIONS[operation]
    event["recorded"] = r["ts"]
    event["outcome"] = _OUTCOMES.get(str(r.get("result")), "8")
    desc = [*(r.get("reason_codes") or []), *([r["error_code"]] if r.get("error_code") else [])]
    if desc:
        event["outcomeDesc"] = " ".join(str(d) for d in desc)
    purpose = r.get("purpose")
    if purpose:
        code = (purpose_map if purpose_map is not None else PURPOSE_OF_USE).get(str(purpose))
        concept: dict[str, Any] = {"text": str(purpose)}
        if code:
            concept["coding"] = [_coding(ACT_REASON, code)]
        event["purposeOfEvent"] = [concept]
    event["agent"] = _agents(r, writer)
    event["source"] = {
        "site": "mcp-fhir",
        "observer": {"identifier": {"system": WRITER_SYSTEM, "value": writer}, "display": "mcp-fhir sidecar"},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }
    entities = _entities(r)
    if entities:
        event["entity"] = entities
    return event


def _agents(r: Mapping[str, Any], writer: str) -> list[dict[str, Any]]:
    agents: list[dict[str, Any]] = []
    client: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": AGENT_SYSTEM, "value": str(r.get("subject_id") or "unknown")}},
        "requestor": True,
    }
    if r.get("authn"):
        client["altId"] = f"authn:{r['authn']}"
    agents.append(client)
    if r.get("on_behalf_of"):
        agents.append({
            "type": {"coding": [_coding(SECURITY_ROLE_TYPE, "humanuser", "human user")]},
            "who": {"identifier": {"system": USER_SYSTEM, "value": str(r["on_behalf_of"])}},
            "requestor": True,
        })  # fmt: skip
    agents.append({
        "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
        "who": {"identifier": {"system": WRITER_SYSTEM, "value": writer}},
        "requestor": False,
    })  # fmt: skip
    return agents


def _entities(r: Mapping[str, Any]) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if r.get("patient"):
        entities.append({
            "what": {"reference": f"Patient/{r['patient']}"},
            "type": _coding(ENTITY_TYPE, "1", "Person"),
            "role": _coding(OBJECT_ROLE, "1", "Patient"),
        })  # fmt: skip
    params = r.get("params") or {}
    if params or str(r.get("operation") or "").startswith("search"):
        query = _query_string(r.get("resource_type"), params)
        entities.append({
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "24", "Query"),
            "query": base64.b64encode(query.encode()).decode(),
            **({"description": str(r["tool"])} if r.get("tool") else {}),
        })  # fmt: skip
    details = [
        _detail(key, r[key])
        for key in ("policy_revision", "returned_count", "filtered_count", "cache", "sensitivity",
                    "break_glass_reason", "request_id", "trace_id", "backend")
        if r.get(key) is not None
    ]  # fmt: skip
    for key in ("reason_codes", "scopes", "alerts"):
        if r.get(key):
            details.append(_detail(key, list(r[key])))
    if r.get("decision_id") or details:
        decision: dict[str, Any] = {
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "name": "policy decision",
        }
        if r.get("decision_id"):
            decision["what"] = {"identifier": {"system": DECISION_SYSTEM, "value": str(r["decision_id"])}}
        if details:
            decision["detail"] = details
        entities.append(decision)
    return entities


def to_bundle(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A ``collection`` Bundle of AuditEvents."""
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": e} for e in events]}


def to_ndjson(events: Iterable[dict[str, Any]]) -> str:
    """One AuditEvent per line."""
    return "".join(json.dumps(e, separators=(",", ":"), sort_keys=True) + "\n" for e in events)
