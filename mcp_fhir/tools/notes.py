"""Clinical notes, declared: read one note's text, and write a note (idempotently, never retried blindly).

A note is written the AI Transparency on FHIR way (`transparency.py`): one transaction holding the
note labelled `AIAST`, the agent's AI-Device (with the model, when its MCP client info names one) and an
AI-Provenance naming the agent, the person it acted for and the decision id. The note's conditional
create (`ifNoneExist` on its idempotency key) makes a repeat find the first note instead of a second.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any

from mcp.types import ToolAnnotations
from pydantic import Field

from mcp_fhir._exceptions import UpstreamBadResponse
from mcp_fhir.tools.callpath import Call
from mcp_fhir.tools.clinical import PatientArgs
from mcp_fhir.tools.declare import Enforced, Fetched, Tool, ToolArgs
from mcp_fhir.tools.params import PatientId, Purpose, ResourceId, audit_params
from mcp_fhir.tools.results import (
    DocumentText,
    NoteCreated,
    injection_flags,
    provenance,
    render_document,
    render_note,
)
from mcp_fhir.tools.transparency import ClientInfo, write_transaction

IDEMPOTENCY_SYSTEM = "urn:mcp-fhir:idempotency-key"
NOTE_TYPE = {"system": "http://loinc.org", "code": "11506-3", "display": "Progress note"}

IdempotencyKey = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9\-_]{8,64}$", description="Client-chosen key; repeating it never duplicates."),
]
NoteText = Annotated[str, Field(min_length=1, max_length=20_000, description="The note, as plain text.")]
NoteTitle = Annotated[str, Field(min_length=1, max_length=200, description="A short title.")]


def _note_text(doc: dict[str, Any], max_chars: int) -> tuple[str | None, str | None, bool]:
    for content in doc.get("content") or []:
        att = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(att, dict) or "data" not in att:
            continue
        ctype = att.get("contentType")
        if ctype and not str(ctype).startswith("text/"):
            continue
        try:
            text = base64.b64decode(att["data"], validate=True).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            continue
        return ctype, text[:max_chars], len(text) > max_chars
    return None, None, False


# --- read_document --------------------------------------------------------------------------------------------


class DocumentArgs(PatientArgs):
    document_id: ResourceId


async def fetch_document(call: Call, args: DocumentArgs) -> Fetched:
    fetch = await call.app.backend(call.backend).read(
        "DocumentReference", args.document_id, patient=call.patient
    )
    return Fetched(fetch.resources, source=fetch)


def build_document(call: Call, args: DocumentArgs, fetched: Fetched, enforced: Enforced) -> DocumentText:
    app = call.app
    kept = enforced.resources
    ctype, text, truncated = _note_text(kept[0], app.limits.max_note_chars) if kept else (None, None, False)
    return DocumentText(
        document_id=args.document_id,
        patient=args.patient_id,
        content_type=ctype,
        text=text,
        truncated=truncated,
        looks_like_instructions=bool(text and app.flag_injection and injection_flags(text)),
        withheld=enforced.withheld,
        provenance=provenance(fetched.upstream, call.decision),
    )


READ_DOCUMENT = Tool(
    name="read_document",
    description="Read one clinical note's text, fenced as data, under policy.",
    args=DocumentArgs,
    result=DocumentText,
    operation="read",
    resource_type="DocumentReference",
    fetch=fetch_document,
    build=build_document,
    render=render_document,
)


# --- create_clinical_note -------------------------------------------------------------------------------------


class NoteArgs(ToolArgs):
    patient_id: PatientId
    title: NoteTitle
    text: NoteText
    idempotency_key: IdempotencyKey
    purpose: Purpose = None

    def narrowing(self) -> dict[str, Any]:
        # The decision input and the audit hold a digest of the note, never the note.
        digest = hashlib.sha256(self.text.encode()).hexdigest()[:16]
        return audit_params(
            idempotency_key=self.idempotency_key,
            title_length=len(self.title),
            text_length=len(self.text),
            text_sha256=digest,
        )


async def create_note(call: Call, args: NoteArgs) -> Fetched:
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    key = args.idempotency_key
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "identifier": [{"system": IDEMPOTENCY_SYSTEM, "value": key}],
        "status": "current",
        "docStatus": "preliminary",
        "type": {"coding": [NOTE_TYPE], "text": "Progress note"},
        "subject": {"reference": f"Patient/{call.backend_patient}"},
        "date": now,
        "description": args.title,
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "title": args.title,
                    "data": base64.b64encode(args.text.encode()).decode(),
                }
            }
        ],
    }
    if call.subject.on_behalf_of:
        doc["author"] = [{"reference": call.subject.on_behalf_of}]
    bundle = write_transaction(
        doc,
        agent_id=call.subject.id,
        on_behalf_of=call.subject.on_behalf_of,
        decision_id=call.decision.decision_id,
        client=ClientInfo(call.client_info),
    )
    bundle["entry"][0]["request"]["ifNoneExist"] = f"identifier={IDEMPOTENCY_SYSTEM}|{key}"
    fetch = await call.app.backend(call.backend).transaction(bundle, patient=call.patient)
    note = _written(fetch.resources[0], "DocumentReference")
    return Fetched(
        [note],
        source=fetch,
        audit_extra={"created": bool(fetch.created), "transparency": _written_refs(fetch.resources[0])},
        write=True,
    )


def _written(response: dict[str, Any], rtype: str) -> dict[str, Any]:
    """The first entry of a transaction-response: its resource, or its type and id from its location."""
    entry = (response.get("entry") or [{}])[0] or {}
    resource = entry.get("resource")
    if isinstance(resource, dict) and resource.get("resourceType") == rtype and resource.get("id"):
        return resource
    location = str((entry.get("response") or {}).get("location") or "")
    parts = location.split("/")
    if rtype in parts and parts.index(rtype) + 1 < len(parts):
        return {"resourceType": rtype, "id": parts[parts.index(rtype) + 1]}
    raise UpstreamBadResponse("the EHR's transaction response does not name the written note")


def _written_refs(response: dict[str, Any]) -> list[str]:
    """Type/id of everything the transaction wrote or found (note, Device, Provenance), for the audit."""
    out = []
    for entry in response.get("entry") or []:
        location = str(((entry or {}).get("response") or {}).get("location") or "")
        out.append("/".join(location.split("/")[-4:-2]) if "/_history/" in location else location)
    return out


def keep_written(_call: Call, fetched: Fetched) -> Enforced:
    """A write returns only what it wrote: there is nothing to filter."""
    return Enforced(fetched.resources)


def build_note(call: Call, args: NoteArgs, fetched: Fetched, _enforced: Enforced) -> NoteCreated:
    return NoteCreated(
        document_id=str(fetched.resources[0].get("id")),
        patient=args.patient_id,
        created=bool(fetched.upstream.created),
        provenance=provenance(fetched.upstream, call.decision),
    )


CREATE_CLINICAL_NOTE = Tool(
    name="create_clinical_note",
    description="Write a clinical note (DocumentReference) for a patient; repeating the key never duplicates it.",
    args=NoteArgs,
    result=NoteCreated,
    operation="create",
    resource_type="DocumentReference",
    fetch=create_note,
    enforce=keep_written,
    build=build_note,
    render=render_note,
    annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    ),
)

TOOLS: tuple[Tool, ...] = (READ_DOCUMENT, CREATE_CLINICAL_NOTE)
