"""The tool catalogue: each tool's operation and the FHIR resource types it touches.

This is the sidecar's half of a contract; `policies/data/tools.yaml` is the policy's half,
and a test keeps them equal. The catalogue names no role, purpose or label: what a caller
may do with a tool is decided by OPA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

Operation = Literal["read", "search", "create", "update"]

PATIENT_TYPES: tuple[str, ...] = (
    "Patient",
    "Observation",
    "MedicationStatement",
    "MedicationRequest",
    "Condition",
    "Encounter",
    "Procedure",
    "AllergyIntolerance",
    "DocumentReference",
)

SUMMARY_SECTIONS: tuple[str, ...] = (
    "Patient",
    "Condition",
    "MedicationStatement",
    "Observation",
    "AllergyIntolerance",
)

# tool name -> (operation, resource types)
CATALOGUE: Mapping[str, tuple[Operation, tuple[str, ...]]] = {
    "read_patient": ("read", ("Patient",)),
    "search_observations": ("search", ("Observation",)),
    "search_medication_statements": ("search", ("MedicationStatement",)),
    "search_medication_requests": ("search", ("MedicationRequest",)),
    "search_conditions": ("search", ("Condition",)),
    "search_encounters": ("search", ("Encounter",)),
    "search_procedures": ("search", ("Procedure",)),
    "search_allergies": ("search", ("AllergyIntolerance",)),
    "list_documents": ("search", ("DocumentReference",)),
    "search_immunizations": ("search", ("Immunization",)),
    "read_document": ("read", ("DocumentReference",)),
    "patient_summary": ("read", SUMMARY_SECTIONS),
    "create_clinical_note": ("create", ("DocumentReference",)),
    "refresh": ("search", PATIENT_TYPES),
    "search_audit_log": ("search", ("AuditEvent",)),
    "audit_disclosures": ("search", ("AuditEvent",)),
}

# Resource types the sidecar serves itself and never requests from an EHR.
LOCAL_TYPES: frozenset[str] = frozenset({"AuditEvent"})
