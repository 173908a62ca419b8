"""Issue #11 (1): the authorization bypass matrix, through the official MCP client, the real OPA and
the real FHIR test bed.

Every case is one tool call by one crafted credential. A case passes when the call is refused
(a policy denial with the expected reason code, or a typed argument error) or returns only data
the policy permits: every returned resource belongs to the requested patient and nothing the
obligations withhold is present. Either way, the call left an `access` record in the audit file.

The credential is the configured local identity (stdio): its claims are exactly what a verified
JWT or API key would carry, so these cases exercise what the policy makes of crafted claims. The
same claims over streamable HTTP with API keys are in `test_authz_bypass_http.py`; EHR responses
that smuggle in another patient's resources are in `test_foreign_resources.py`.

What the policy intends (policies/mcp_fhir/config/claims/data.yaml, roles/data.yaml): roles come
only from the `roles` claim, a list of strings mapped through `role_map`; anything else grants
nothing. A credential that lists two roles holds both (the issuer vouched for both), so
`roles: ["nurse", "clinician"]` is a clinician: that case is here to pin the intent, not a bypass.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.adversarial.conftest import attempt, identity, sidecar, tool_error
from tests.testbed import data

pytestmark = pytest.mark.integration

PID = data.AU_PATIENT_ID  # pat-au-001: PSY-labelled condition and note
OTHER = data.AU_DVA_PATIENT_ID  # pat-au-002: HIV, ETH, SDV+R labels
ALL_READ = ("user/*.rs",)
TREAT = {"patient_id": PID, "purpose": "treatment"}

CLINICIAN = identity("adv-clinician", {"roles": ["clinician"]}, ("user/*.rs", "user/DocumentReference.c"))
NURSE = identity("adv-nurse", {"roles": ["nurse"]}, ("user/Patient.rs", "user/Observation.rs"))


@dataclass(frozen=True)
class Case:
    """One attempt. `expect` is `denied` (policy), `invalid` (argument error) or `allowed`."""

    name: str
    group: str
    who: dict[str, Any]
    tool: str
    args: dict[str, Any]
    expect: str
    reasons: tuple[str, ...] = ()
    error_code: str = "invalid_argument"
    check: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)


def _refs(resource: dict[str, Any]) -> set[str]:
    out = set()
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            out.add(ref["reference"])
    return out


def only_patient(body: dict[str, Any], pid: str) -> None:
    """Every returned resource is the patient or points at the patient, and at no one else."""
    for r in body.get("resources") or []:
        if r.get("resourceType") == "Patient":
            assert r.get("id") == pid
        else:
            assert _refs(r) == {f"Patient/{pid}"}, r.get("id")


def labels_of(body: dict[str, Any]) -> set[str]:
    return {
        c.get("code")
        for r in body.get("resources") or []
        for c in (r.get("meta") or {}).get("security") or []
    }


def no_sensitive_labels(body: dict[str, Any]) -> None:
    assert not labels_of(body) & {"PSY", "HIV", "ETH", "SDV", "R"}


def redacted_contact(body: dict[str, Any]) -> None:
    [patient] = body["resources"]
    assert not {"address", "telecom", "contact"} & set(patient)
    assert body["withheld"]["redacted_elements"] >= 1


def hiv_withheld(body: dict[str, Any]) -> None:
    assert data.HIV_OBSERVATION_ID not in {r["id"] for r in body["resources"]}
    assert body["withheld"]["security_label"] >= 1


def foreign_note_dropped(body: dict[str, Any]) -> None:
    assert body["text"] is None
    assert body["withheld"]["over_limit"] == 1


def only_vital_signs(body: dict[str, Any]) -> None:
    for r in body["resources"]:
        codes = {c["code"] for cat in r.get("category") or [] for c in cat.get("coding") or []}
        assert "vital-signs" in codes


def clinician_with(scopes: tuple[str, ...] = ALL_READ, **claims: Any) -> dict[str, Any]:
    return identity("adv-clinician", {"roles": ["clinician"], **claims}, scopes)


def with_roles(roles: Any, key: str = "roles", **claims: Any) -> dict[str, Any]:
    return identity("adv-crafted", {key: roles, **claims}, ALL_READ)


MED = "search_medication_statements"
MATRIX: list[Case] = [
    # --- role escalation through crafted claims ---------------------------------------------------------
    Case("roles as a string", "role", with_roles("clinician"), MED, TREAT, "denied", ("NO_ROLE",)),
    Case(
        "singular role claim",
        "role",
        with_roles(["clinician"], key="role"),
        MED,
        TREAT,
        "denied",
        ("NO_ROLE",),
    ),
    Case("roles as an object", "role", with_roles({"clinician": True}), MED, TREAT, "denied", ("NO_ROLE",)),
    Case("roles nested in a list", "role", with_roles([["clinician"]]), MED, TREAT, "denied", ("NO_ROLE",)),
    Case("role in another case", "role", with_roles(["Clinician"]), MED, TREAT, "denied", ("NO_ROLE",)),
    Case("role padded with a space", "role", with_roles([" clinician"]), MED, TREAT, "denied", ("NO_ROLE",)),
    Case(
        "role names not in role_map",
        "role",
        with_roles(["superuser", "*", "role_map"]),
        MED,
        TREAT,
        "denied",
        ("NO_ROLE",),
    ),
    Case(
        "Keycloak-style realm_access roles",
        "role",
        with_roles(["nurse"], realm_access={"roles": ["clinician"]}, groups=["clinician"]),
        MED,
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "a role_map claim",
        "role",
        with_roles(["nurse"], role_map={"nurse": "clinician"}),
        MED,
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "non-string role values",
        "role",
        with_roles(["nurse", 1, None, {"clinician": 1}, ["clinician"]]),
        MED,
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "a smuggled subject block claim",
        "role",
        with_roles(["nurse"], mcp_fhir_subject={"id": "x", "claims": {"roles": ["clinician"]}}),
        MED,
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "admin reading patient data",
        "role",
        with_roles(["admin"]),
        "read_patient",
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "auditor reading patient data",
        "role",
        with_roles(["auditor"]),
        "read_patient",
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "two roles in one credential hold both (intended)",
        "role",
        with_roles(["nurse", "clinician"]),
        MED,
        TREAT,
        "allowed",
        check=no_sensitive_labels,
    ),
    # --- purpose spoofed in the arguments ---------------------------------------------------------------
    Case(
        "declared treatment over a bound medication_reconciliation",
        "purpose",
        clinician_with(purpose_of_use="medication_reconciliation"),
        MED,
        TREAT,
        "denied",
        ("PURPOSE_MISMATCH",),
    ),
    Case(
        "declared treatment to reach observations",
        "purpose",
        clinician_with(purpose_of_use="medication_reconciliation"),
        "search_observations",
        TREAT,
        "denied",
        ("PURPOSE_MISMATCH",),
    ),
    Case(
        "bound purpose does not cover observations",
        "purpose",
        clinician_with(purpose_of_use="medication_reconciliation"),
        "search_observations",
        {"patient_id": PID},
        "denied",
        ("PURPOSE_NOT_PERMITTED",),
    ),
    Case(
        "bound purpose still redacts contact details",
        "purpose",
        clinician_with(purpose_of_use="medication_reconciliation"),
        "read_patient",
        {"patient_id": PID},
        "allowed",
        check=redacted_contact,
    ),
    Case(
        "bound purpose as a list",
        "purpose",
        clinician_with(purpose_of_use=["treatment"]),
        MED,
        TREAT,
        "denied",
        ("PURPOSE_MISMATCH",),
    ),
    Case(
        "bound purpose empty",
        "purpose",
        clinician_with(purpose_of_use=""),
        MED,
        TREAT,
        "denied",
        ("PURPOSE_MISMATCH",),
    ),
    Case(
        "declared purpose in capitals",
        "purpose",
        CLINICIAN,
        MED,
        {"patient_id": PID, "purpose": "TREATMENT"},
        "invalid",
    ),
    Case(
        "declared purpose with a trailing space",
        "purpose",
        CLINICIAN,
        MED,
        {"patient_id": PID, "purpose": "treatment "},
        "invalid",
    ),
    Case(
        "declared purpose unknown to policy",
        "purpose",
        CLINICIAN,
        MED,
        {"patient_id": PID, "purpose": "research"},
        "denied",
        ("PURPOSE_UNKNOWN",),
    ),
    Case(
        "declared audit purpose on clinical data",
        "purpose",
        CLINICIAN,
        MED,
        {"patient_id": PID, "purpose": "audit"},
        "denied",
        ("PURPOSE_NOT_PERMITTED",),
    ),
    Case(
        "nurse declares a purpose her role lacks",
        "purpose",
        NURSE,
        "search_observations",
        {"patient_id": PID, "purpose": "discharge_summary"},
        "denied",
        ("ROLE_PURPOSE_NOT_PERMITTED",),
    ),
    Case(
        "no purpose at all", "purpose", CLINICIAN, MED, {"patient_id": PID}, "denied", ("PURPOSE_REQUIRED",)
    ),
    # --- patient switched / patient ids smuggled --------------------------------------------------------
    Case(
        "bound to A, asks for B",
        "patient",
        clinician_with(patient=PID),
        MED,
        {"patient_id": OTHER, "purpose": "treatment"},
        "denied",
        ("PATIENT_MISMATCH",),
    ),
    Case(
        "bound to A, summary of B",
        "patient",
        clinician_with(patient=PID),
        "patient_summary",
        {"patient_id": OTHER, "purpose": "treatment"},
        "denied",
        ("PATIENT_MISMATCH",),
    ),
    Case(
        "bound as a list",
        "patient",
        clinician_with(patient=[PID]),
        MED,
        TREAT,
        "denied",
        ("PATIENT_MISMATCH",),
    ),
    Case(
        "bound as Patient/A reads A (canonical form)",
        "patient",
        clinician_with(patient=f"Patient/{PID}"),
        "read_patient",
        TREAT,
        "allowed",
        check=lambda b: only_patient(b, PID),
    ),
    Case(
        "patient id as a reference",
        "patient",
        CLINICIAN,
        MED,
        {"patient_id": f"Patient/{OTHER}", "purpose": "treatment"},
        "invalid",
    ),
    Case(
        "two patient ids, comma-separated",
        "patient",
        CLINICIAN,
        MED,
        {"patient_id": f"{PID},{OTHER}", "purpose": "treatment"},
        "invalid",
    ),
    Case(
        "path traversal in the patient id",
        "patient",
        CLINICIAN,
        "read_patient",
        {"patient_id": f"{PID}/../{OTHER}", "purpose": "treatment"},
        "invalid",
    ),
    Case(
        "an id the map does not know",
        "patient",
        CLINICIAN,
        "read_patient",
        {"patient_id": "pat-nobody", "purpose": "treatment"},
        "invalid",
        error_code="unknown_patient",
    ),
    Case(
        "another patient's note by id",
        "patient",
        CLINICIAN,
        "read_document",
        {
            "patient_id": data.AU_INJECTION_PATIENT_ID,
            "document_id": data.DISCHARGE_NOTE_ID,
            "purpose": "treatment",
        },
        "allowed",
        check=lambda b: foreign_note_dropped(b),
    ),
    # --- another patient inside search parameters ------------------------------------------------------
    Case(
        "category carrying Patient/other",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "category": f"Patient/{OTHER}"},
        "allowed",
        check=lambda b: only_patient(b, PID),
    ),
    Case(
        "code system carrying Patient/other",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "code": f"Patient/{OTHER}|x"},
        "allowed",
        check=lambda b: only_patient(b, PID),
    ),
    Case(
        "category with an appended subject parameter",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "category": f"laboratory&subject=Patient/{OTHER}"},
        "invalid",
    ),
    Case(
        "code with an appended patient parameter",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "code": f"x&patient={OTHER}"},
        "invalid",
    ),
    Case(
        "category list reaching another patient",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "category": f"laboratory,Patient/{OTHER}"},
        "invalid",
    ),
    Case(
        "chained subject argument",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "subject": f"Patient/{OTHER}"},
        "invalid",
    ),
    Case(
        "_include argument",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "_include": "Observation:subject"},
        "invalid",
    ),
    Case(
        "_revinclude argument",
        "params",
        CLINICIAN,
        "read_patient",
        {**TREAT, "_revinclude": "Observation:subject"},
        "invalid",
    ),
    Case(
        "a second patient argument",
        "params",
        CLINICIAN,
        "search_observations",
        {**TREAT, "patient": OTHER},
        "invalid",
    ),
    # --- break-glass ------------------------------------------------------------------------------------
    Case(
        "nurse invokes break-glass",
        "break_glass",
        NURSE,
        "search_observations",
        {
            "patient_id": OTHER,
            "purpose": "treatment",
            "break_glass_reason": "patient unconscious in ED, need HIV",
        },
        "denied",
        ("BREAK_GLASS_NOT_PERMITTED",),
    ),
    Case(
        "nurse without break-glass never sees labelled data",
        "break_glass",
        NURSE,
        "search_observations",
        {"patient_id": OTHER, "purpose": "treatment"},
        "allowed",
        check=hiv_withheld,
    ),
    Case(
        "admin invokes break-glass",
        "break_glass",
        with_roles(["admin"]),
        "read_patient",
        {**TREAT, "break_glass_reason": "emergency override, trust me"},
        "denied",
        ("BREAK_GLASS_NOT_PERMITTED",),
    ),
    Case(
        "break-glass with a token reason",
        "break_glass",
        CLINICIAN,
        "search_observations",
        {**TREAT, "break_glass_reason": "x"},
        "invalid",
    ),
    # --- scopes for a different resource type ------------------------------------------------------------
    Case(
        "Observation scope, Condition tool",
        "scope",
        clinician_with(("user/Observation.rs",)),
        "search_conditions",
        TREAT,
        "denied",
        ("SCOPE_NOT_GRANTED",),
    ),
    Case(
        "patient/ Observation scope, Condition tool",
        "scope",
        clinician_with(("patient/Observation.rs",)),
        "search_conditions",
        TREAT,
        "denied",
        ("SCOPE_NOT_GRANTED",),
    ),
    Case(
        "scope with a query the sidecar cannot enforce",
        "scope",
        clinician_with(("user/Observation.rs?code=1",)),
        "search_observations",
        TREAT,
        "denied",
        ("SCOPE_NOT_GRANTED",),
    ),
    Case(
        "category scope, other category asked",
        "scope",
        clinician_with(("user/Observation.rs?category=vital-signs",)),
        "search_observations",
        {**TREAT, "category": "laboratory"},
        "denied",
        ("CATEGORY_NOT_PERMITTED",),
    ),
    Case(
        "category scope narrows what comes back",
        "scope",
        clinician_with(("user/Observation.rs?category=vital-signs",)),
        "search_observations",
        {"patient_id": data.SERIES_PATIENT_ID, "purpose": "treatment"},
        "allowed",
        check=only_vital_signs,
    ),
    Case(
        "search-only scope on a read",
        "scope",
        clinician_with(("user/*.s",)),
        "read_patient",
        TREAT,
        "denied",
        ("SCOPE_NOT_GRANTED",),
    ),
    Case(
        "no scopes at all",
        "scope",
        clinician_with(()),
        "read_patient",
        TREAT,
        "denied",
        ("SCOPE_NOT_GRANTED",),
    ),
    Case(
        "read scope on a write",
        "scope",
        clinician_with(("user/DocumentReference.rs",)),
        "create_clinical_note",
        {**TREAT, "title": "t", "text": "x", "idempotency_key": "adv-read-scope-write"},
        "denied",
        ("SCOPE_NOT_GRANTED",),
    ),
    # --- tools not in the visible list ------------------------------------------------------------------
    Case(
        "nurse calls an invisible medication tool",
        "tools",
        NURSE,
        MED,
        TREAT,
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case(
        "nurse calls the invisible audit log",
        "tools",
        NURSE,
        "search_audit_log",
        {"purpose": "audit"},
        "denied",
    ),
    Case(
        "nurse calls the invisible note writer",
        "tools",
        NURSE,
        "create_clinical_note",
        {**TREAT, "title": "t", "text": "x", "idempotency_key": "adv-nurse-write"},
        "denied",
        ("ROLE_NOT_PERMITTED",),
    ),
    Case("a tool that does not exist", "tools", CLINICIAN, "delete_patient", {"patient_id": PID}, "invalid"),
    Case(
        "a tool name with a path",
        "tools",
        CLINICIAN,
        "read_patient/../create_clinical_note",
        TREAT,
        "invalid",
    ),
    # --- writes through read tools ---------------------------------------------------------------------
    Case(
        "a method argument on a read tool",
        "write",
        CLINICIAN,
        "search_observations",
        {**TREAT, "method": "POST"},
        "invalid",
    ),
    Case(
        "a resource body on a read tool",
        "write",
        CLINICIAN,
        "read_patient",
        {**TREAT, "resource": {"resourceType": "Patient", "id": PID, "active": False}},
        "invalid",
    ),
    Case(
        "write under a read-only purpose",
        "write",
        CLINICIAN,
        "create_clinical_note",
        {
            "patient_id": PID,
            "purpose": "medication_reconciliation",
            "title": "t",
            "text": "x",
            "idempotency_key": "adv-medrec-write",
        },
        "denied",
        ("PURPOSE_NOT_PERMITTED",),
    ),
]


@pytest.mark.parametrize("case", MATRIX, ids=[f"{c.group}: {c.name}" for c in MATRIX])
async def test_bypass_attempt_is_refused_or_returns_only_permitted_data_and_is_audited(
    case: Case, tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    async with sidecar(tmp_path, fhir_server.base_url, opa_url, case.who) as sc:
        visible = {t.name for t in (await sc.client.list_tools()).tools}
        result = await attempt(sc.client, case.tool, case.args)
        records = sc.audit()
    assert records, "every attempt leaves an access record"
    if case.expect == "allowed":
        assert not isinstance(result, Exception) and not result.is_error, result.content[0].text
        body = result.structured_content
        if "resources" in body:
            only_patient(body, case.args.get("patient_id", PID))
        if case.check is not None:
            case.check(body)
        assert {r["result"] for r in records} == {"allowed"}
        assert case.tool in visible
        return
    err = tool_error(result)
    if case.expect == "invalid":
        assert err["code"] == case.error_code
        assert {r["result"] for r in records} == {"error"}
        assert {r["error_code"] for r in records} == {case.error_code}
        return
    assert err["code"] == "policy_denied"
    assert set(case.reasons) <= set(err["reasons"]), err["reasons"]
    assert err["decision_id"]
    assert all(r["result"] == "denied" for r in records)
    assert any(r["decision_id"] == err["decision_id"] for r in records)
    assert all(set(case.reasons) <= set(r["reason_codes"]) for r in records)


async def test_a_patient_switched_mid_session_is_denied_after_the_bound_patient_was_allowed(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    async with sidecar(tmp_path, fhir_server.base_url, opa_url, clinician_with(patient=PID)) as sc:
        first = await sc.client.call_tool("read_patient", TREAT)
        second = await sc.client.call_tool("read_patient", {"patient_id": OTHER, "purpose": "treatment"})
        third = await sc.client.call_tool("read_patient", TREAT)
        records = sc.audit()
    assert not first.is_error and not third.is_error
    assert tool_error(second)["reasons"] == ["PATIENT_MISMATCH"]
    assert [(r["patient"], r["result"]) for r in records] == [
        (PID, "allowed"),
        (OTHER, "denied"),
        (PID, "allowed"),
    ]


async def test_invisible_tools_are_absent_from_the_listing_and_denied_when_called(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    async with sidecar(tmp_path, fhir_server.base_url, opa_url, NURSE) as sc:
        visible = {t.name for t in (await sc.client.list_tools()).tools}
        hidden = sorted({MED, "create_clinical_note", "search_audit_log", "list_documents"} - visible)
        results = [await attempt(sc.client, name, TREAT) for name in hidden]
    assert set(hidden) == {"create_clinical_note", "list_documents", MED, "search_audit_log"}
    assert all(tool_error(r)["code"] in ("policy_denied", "invalid_argument") for r in results)


async def test_a_tool_disabled_in_config_cannot_be_called_at_all(
    tmp_path: Path, fhir_server: Any, opa_url: str
) -> None:
    async with sidecar(tmp_path, fhir_server.base_url, opa_url, CLINICIAN, tools=["read_patient"]) as sc:
        visible = {t.name for t in (await sc.client.list_tools()).tools}
        result = await attempt(sc.client, "search_observations", TREAT)
        [record] = sc.audit()
    assert visible == {"read_patient"}
    assert tool_error(result)["code"] == "invalid_argument"
    assert record["result"] == "error" and record["error_code"] == "invalid_argument"


async def test_refused_writes_never_reach_the_ehr(tmp_path: Path, fhir_server: Any, opa_url: str) -> None:
    key = f"adv-{uuid.uuid4().hex[:16]}"
    note = {**TREAT, "title": "t", "text": "x", "idempotency_key": key}
    async with sidecar(tmp_path / "n", fhir_server.base_url, opa_url, NURSE) as sc:
        nurse = await sc.client.call_tool("create_clinical_note", note)
    async with sidecar(
        tmp_path / "m",
        fhir_server.base_url,
        opa_url,
        clinician_with(("user/*.rs", "user/DocumentReference.c"), purpose_of_use="medication_reconciliation"),
    ) as sc:
        medrec = await sc.client.call_tool("create_clinical_note", {**note, "purpose": None})
    async with httpx2.AsyncClient(timeout=5.0) as http:
        found = (
            await http.get(
                f"{fhir_server.base_url}/DocumentReference",
                params={"identifier": f"urn:mcp-fhir:idempotency-key|{key}"},
            )
        ).json()
    assert tool_error(nurse)["code"] == tool_error(medrec)["code"] == "policy_denied"
    assert not found.get("entry")
