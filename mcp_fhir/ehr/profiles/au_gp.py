"""Australian general practice systems (Best Practice, MedicalDirector, Genie).

FHIR where they have it (normalised like plain R4) plus HL7 v2 ORU^R01 results (``supports_hl7v2_results``,
see ``mcp_fhir.ehr.hl7v2``). AU Core-aware identifiers are lifted into ``extras``:

=================  ==================================================  ===================
extras key         Identifier.system                                   check
=================  ==================================================  ===================
``ihi``            http://ns.electronichealth.net.au/id/hi/ihi/1.0     16 digits, 800360, Luhn
``hpii``           http://ns.electronichealth.net.au/id/hi/hpii/1.0    16 digits, 800361, Luhn
``hpio``           http://ns.electronichealth.net.au/id/hi/hpio/1.0    16 digits, 800362, Luhn
``medicare_number`` http://ns.electronichealth.net.au/id/medicare-number  check digit (10/11 digits)
``dva_number``     http://ns.electronichealth.net.au/id/dva            format only
=================  ==================================================  ===================

An identifier that fails its check is never dropped silently: it stays in the resource, is not lifted, and a
warning ``{"path": "Patient.identifier[1]", "kind": "medicare_number", "rule": "..."}`` is added to
``extras["identifier_warnings"]`` (no value: identifiers are PHI).

``best_practice``, ``medical_director`` and ``genie`` are aliases of ``au_gp`` that differ only by name, so
configuration and audit records can say which product answered. None of them publishes a rate limit for
on-premises FHIR, so the default is None (callers set one with ``Profile.with_rate_limit``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mcp_fhir.ehr.au_identifiers import (
    is_valid_dva,
    is_valid_hpii,
    is_valid_hpio,
    is_valid_ihi,
    is_valid_medicare,
    normalise_number,
)
from mcp_fhir.ehr.profiles.base import (
    DEFAULT_PATIENT_SEARCH_PARAM,
    FHIR_R4,
    Normalised,
    Profile,
    common_extras,
    identifiers_of,
)

__all__ = [
    "AU_GP_ALIASES",
    "AU_GP_PROFILE",
    "AU_IDENTIFIER_SYSTEMS",
    "BEST_PRACTICE_PROFILE",
    "GENIE_PROFILE",
    "MEDICAL_DIRECTOR_PROFILE",
    "au_identifier_extras",
    "normalise_au_gp",
]

IHI_SYSTEM = "http://ns.electronichealth.net.au/id/hi/ihi/1.0"
HPII_SYSTEM = "http://ns.electronichealth.net.au/id/hi/hpii/1.0"
HPIO_SYSTEM = "http://ns.electronichealth.net.au/id/hi/hpio/1.0"
MEDICARE_SYSTEM = "http://ns.electronichealth.net.au/id/medicare-number"
DVA_SYSTEM = "http://ns.electronichealth.net.au/id/dva"

# system -> (extras key, validator, rule shown in warnings)
AU_IDENTIFIER_SYSTEMS: Mapping[str, tuple[str, Callable[[str], bool], str]] = {
    IHI_SYSTEM: ("ihi", is_valid_ihi, "IHI must be 16 digits, prefix 800360, Luhn check digit"),
    HPII_SYSTEM: ("hpii", is_valid_hpii, "HPI-I must be 16 digits, prefix 800361, Luhn check digit"),
    HPIO_SYSTEM: ("hpio", is_valid_hpio, "HPI-O must be 16 digits, prefix 800362, Luhn check digit"),
    MEDICARE_SYSTEM: (
        "medicare_number",
        is_valid_medicare,
        "Medicare number must be 10 or 11 digits, first digit 2-6, valid check digit",
    ),
    DVA_SYSTEM: (
        "dva_number",
        is_valid_dva,
        "DVA number must be 1-3 letters, up to 7 digits, optional letter",
    ),
}


def au_identifier_extras(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Valid AU identifiers by kind, and a PHI-free warning for each invalid one."""
    extras: dict[str, Any] = {}
    warnings: list[dict[str, str]] = []
    rtype = str(resource.get("resourceType", "Resource"))
    raw = resource.get("identifier")
    for index, identifier in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(identifier, Mapping):
            continue
        known = AU_IDENTIFIER_SYSTEMS.get(str(identifier.get("system")))
        if known is None:
            continue
        key, is_valid, rule = known
        value = identifier.get("value")
        if isinstance(value, str) and is_valid(value):
            cleaned = normalise_number(value)
            extras.setdefault(key, cleaned.upper() if key == "dva_number" else cleaned)
        else:
            warnings.append({"path": f"{rtype}.identifier[{index}]", "kind": key, "rule": rule})
    if warnings:
        extras["identifier_warnings"] = warnings
    return extras


def normalise_au_gp(resource: dict[str, Any]) -> Normalised:
    """R4 as delivered, with AU identifiers lifted and checked."""
    extras = common_extras(resource)
    if isinstance(resource.get("id"), str):
        extras["gp_id"] = resource["id"]
    if identifiers_of(resource):
        extras.update(au_identifier_extras(resource))
    return Normalised(resource=resource, extras=extras, unmapped=[])


AU_GP_PROFILE = Profile(
    name="au_gp",
    fhir_version=FHIR_R4,
    default_rate_limit_per_minute=None,
    requires_patient_param=False,
    patient_search_param=DEFAULT_PATIENT_SEARCH_PARAM,
    supports_hl7v2_results=True,
    normaliser=normalise_au_gp,
    description="Australian GP system: FHIR R4 (AU Core identifiers) plus HL7 v2 ORU^R01 results.",
)
BEST_PRACTICE_PROFILE = dataclasses.replace(AU_GP_PROFILE, name="best_practice", description="Best Practice")
MEDICAL_DIRECTOR_PROFILE = dataclasses.replace(
    AU_GP_PROFILE, name="medical_director", description="MedicalDirector"
)
GENIE_PROFILE = dataclasses.replace(AU_GP_PROFILE, name="genie", description="Genie Solutions")
AU_GP_ALIASES: tuple[Profile, ...] = (BEST_PRACTICE_PROFILE, MEDICAL_DIRECTOR_PROFILE, GENIE_PROFILE)
