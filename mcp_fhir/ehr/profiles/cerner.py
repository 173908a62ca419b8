"""Oracle Health / Cerner Millennium (R4).

* Every search on a patient-scoped type must carry ``patient`` (or ``subject`` / ``_id``); Millennium refuses
  the rest, so :meth:`Profile.check_query` rejects them before they are sent (``invalid_argument``).
* Default rate limit 100 requests/min (``with_rate_limit`` to change it).
* ``extras``: ``cerner_id`` (the resource id), ``mrn`` (current MRN: type MRN / v2-0203 MR, not ended),
  ``federated_principal`` (Federated Person Principal), Cerner ``communication-preference`` extension as
  ``communication_preferences``, US Core race/ethnicity/birth sex like Epic, ``ceuuid`` on clinical resources,
  and ``category_data_absent`` when Millennium sends a category that is only a data-absent-reason.
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
    extension_value,
    find_extension,
    first_code,
    identifier_typed,
    identifiers_of,
    pick_identifier,
    us_core_demographics,
)

__all__ = ["CERNER_DEFAULT_RATE_LIMIT_PER_MINUTE", "CERNER_PROFILE", "normalise_cerner"]

CERNER_DEFAULT_RATE_LIMIT_PER_MINUTE = 100
COMMUNICATION_PREFERENCE_URL = "https://fhir-ehr.cerner.com/r4/StructureDefinition/communication-preference"
CEUUID_SYSTEM = "https://fhir.cerner.com/ceuuid"
DATA_ABSENT_REASON_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def _communication_preferences(patient: Mapping[str, Any]) -> list[dict[str, Any]]:
    prefs: list[dict[str, Any]] = []
    for ext in patient.get("extension") or []:
        if not isinstance(ext, Mapping) or ext.get("url") != COMMUNICATION_PREFERENCE_URL:
            continue
        pref: dict[str, Any] = {}
        for sub in ext.get("extension") or []:
            if isinstance(sub, Mapping) and isinstance(sub.get("url"), str):
                value = extension_value(sub)
                pref[sub["url"].replace("-", "_")] = value if isinstance(value, str) else first_code(value)
        prefs.append(pref)
    return prefs


def _patient_extras(patient: Mapping[str, Any]) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    identifiers = identifiers_of(patient)
    mrn = pick_identifier(identifiers, identifier_typed("MRN", "MR"))
    if mrn is not None:
        extras["mrn"] = mrn
    principal = pick_identifier(identifiers, identifier_typed("Federated Person Principal"))
    if principal is not None:
        extras["federated_principal"] = principal
    prefs = _communication_preferences(patient)
    if prefs:
        extras["communication_preferences"] = prefs
    extras.update(us_core_demographics(patient))
    return extras


def _clinical_extras(resource: Mapping[str, Any]) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    ceuuid = pick_identifier(identifiers_of(resource), lambda i: i.get("system") == CEUUID_SYSTEM)
    if ceuuid is not None:
        extras["ceuuid"] = ceuuid
    categories = resource.get("category")
    for category in categories if isinstance(categories, list) else []:
        if isinstance(category, Mapping) and not category.get("coding"):
            reason = extension_value(find_extension(category, DATA_ABSENT_REASON_URL))
            if isinstance(reason, str):
                extras["category_data_absent"] = reason
    return extras


def normalise_cerner(resource: dict[str, Any]) -> Normalised:
    """Millennium R4 is R4: keep the resource, lift the Cerner-specific fields."""
    extras = common_extras(resource)
    if isinstance(resource.get("id"), str):
        extras["cerner_id"] = resource["id"]
    if resource.get("resourceType") == "Patient":
        extras.update(_patient_extras(resource))
    else:
        extras.update(_clinical_extras(resource))
    return Normalised(resource=resource, extras=extras, unmapped=[])


CERNER_PROFILE = Profile(
    name="cerner",
    fhir_version=FHIR_R4,
    default_rate_limit_per_minute=CERNER_DEFAULT_RATE_LIMIT_PER_MINUTE,
    requires_patient_param=True,
    patient_search_param=DEFAULT_PATIENT_SEARCH_PARAM,
    supports_hl7v2_results=False,
    normaliser=normalise_cerner,
    description="Oracle Health / Cerner Millennium R4: patient= on every search, 100 requests/min.",
)
