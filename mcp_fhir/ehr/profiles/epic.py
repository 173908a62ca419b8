"""Epic (R4): lift the MRN, the Epic FHIR id and Epic's Patient/Observation extensions into ``extras``.

Identifier rule (checked against ``epic_r4_patient.json`` and the Patient search bundle): Epic publishes each
patient identifier type under ``urn:oid:1.2.840.114350.1.13.<customer>.<env>.7.5.737384.<type-id>`` and names
the type in ``identifier.type.text`` ("MRN", "EPI", "CEID", ...). The type-id number is customer-specific, so
the text is the primary key:

* ``mrn``: ``type.text`` == "MRN" (case-insensitive) or a v2-0203 ``MR`` coding; failing both, an identifier
  under the Epic OID root ending in ``.7.5.737384.14`` (the sandbox's MRN type).
* ``epi``: ``type.text`` == "EPI"; ``ceid``: ``type.text`` == "CEID".
* current identifiers (no ``period.end``) win over ended ones; ``use: old`` loses.
* ``epic_fhir_id`` is ``Patient.id`` (Epic's FHIR id is not the MRN and must never be confused with it).

Missing extensions leave the matching ``extras`` key absent; nothing here raises on missing data.
Epic's default rate limit is not published; 60/min is our conservative default (configurable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcp_fhir.ehr.profiles.base import (
    DEFAULT_PATIENT_SEARCH_PARAM,
    FHIR_R4,
    Normalised,
    Profile,
    common_extras,
    extension_code,
    identifier_typed,
    identifiers_of,
    pick_identifier,
    us_core_demographics,
)

__all__ = ["EPIC_DEFAULT_RATE_LIMIT_PER_MINUTE", "EPIC_PROFILE", "epic_patient_extras", "normalise_epic"]

EPIC_DEFAULT_RATE_LIMIT_PER_MINUTE = 60
EPIC_OID_ROOT = "urn:oid:1.2.840.114350.1.13."
EPIC_MRN_OID_SUFFIX = ".7.5.737384.14"
EPIC_LAB_COMPONENT_OID_SUFFIX = ".7.2.768282"

LEGAL_SEX_URL = "http://open.epic.com/FHIR/StructureDefinition/extension/legal-sex"
SEX_FOR_CLINICAL_USE_URLS = (
    "http://open.epic.com/FHIR/StructureDefinition/extension/sex-for-clinical-use",
    "http://hl7.org/fhir/StructureDefinition/patient-sexParameterForClinicalUse",
)
GENDER_IDENTITY_URLS = (
    "http://hl7.org/fhir/StructureDefinition/patient-genderIdentity",
    "http://hl7.org/fhir/StructureDefinition/individual-genderIdentity",
)


def _is_epic_mrn_oid(identifier: Mapping[str, Any]) -> bool:
    system = identifier.get("system")
    return (
        isinstance(system, str) and system.startswith(EPIC_OID_ROOT) and system.endswith(EPIC_MRN_OID_SUFFIX)
    )


def epic_patient_extras(patient: Mapping[str, Any]) -> dict[str, Any]:
    """Epic Patient fields: MRN, EPI, CEID, Epic FHIR id, sexes, gender identity, race and ethnicity."""
    extras: dict[str, Any] = {}
    identifiers = identifiers_of(patient)
    mrn = pick_identifier(identifiers, identifier_typed("MRN", "MR")) or pick_identifier(
        identifiers, _is_epic_mrn_oid
    )
    if mrn is not None:
        extras["mrn"] = mrn
    for label in ("EPI", "CEID"):
        value = pick_identifier(identifiers, identifier_typed(label))
        if value is not None:
            extras[label.lower()] = value
    if isinstance(patient.get("id"), str):
        extras["epic_fhir_id"] = patient["id"]
    for key, urls in (
        ("legal_sex", (LEGAL_SEX_URL,)),
        ("sex_for_clinical_use", SEX_FOR_CLINICAL_USE_URLS),
        ("gender_identity", GENDER_IDENTITY_URLS),
    ):
        code = extension_code(patient, *urls)
        if code is not None:
            extras[key] = code
    extras.update(us_core_demographics(patient))
    return extras


def _epic_observation_extras(observation: Mapping[str, Any]) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    code = observation.get("code")
    for coding in (code.get("coding") or []) if isinstance(code, Mapping) else []:
        system = coding.get("system") if isinstance(coding, Mapping) else None
        if isinstance(system, str) and system.startswith(EPIC_OID_ROOT):
            if system.endswith(EPIC_LAB_COMPONENT_OID_SUFFIX) and isinstance(coding.get("code"), str):
                extras["epic_component_id"] = coding["code"]
    return extras


def normalise_epic(resource: dict[str, Any]) -> Normalised:
    """Epic R4 is R4: keep the resource, lift the Epic-specific fields."""
    extras = common_extras(resource)
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        extras.update(epic_patient_extras(resource))
    elif rtype == "Observation":
        extras.update(_epic_observation_extras(resource))
    if rtype != "Patient" and isinstance(resource.get("id"), str):
        extras["epic_fhir_id"] = resource["id"]
    return Normalised(resource=resource, extras=extras, unmapped=[])


EPIC_PROFILE = Profile(
    name="epic",
    fhir_version=FHIR_R4,
    default_rate_limit_per_minute=EPIC_DEFAULT_RATE_LIMIT_PER_MINUTE,
    requires_patient_param=False,
    patient_search_param=DEFAULT_PATIENT_SEARCH_PARAM,
    supports_hl7v2_results=False,
    normaliser=normalise_epic,
    description="Epic FHIR R4 (open.epic.com). MRN vs Epic FHIR id split; Epic Patient extensions lifted.",
)
