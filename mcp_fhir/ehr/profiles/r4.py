"""The plain FHIR R4 profile: identity normalisation (a deep copy), nothing unmapped."""

from __future__ import annotations

from typing import Any

from mcp_fhir.ehr.profiles.base import (
    DEFAULT_PATIENT_SEARCH_PARAM,
    FHIR_R4,
    Normalised,
    Profile,
    common_extras,
)

__all__ = ["R4_PROFILE", "normalise_r4"]


def normalise_r4(resource: dict[str, Any]) -> Normalised:
    """Identity: the resource is already R4. Only the common extras are lifted."""
    return Normalised(resource=resource, extras=common_extras(resource), unmapped=[])


R4_PROFILE = Profile(
    name="r4",
    fhir_version=FHIR_R4,
    default_rate_limit_per_minute=None,
    requires_patient_param=False,
    patient_search_param=DEFAULT_PATIENT_SEARCH_PARAM,
    supports_hl7v2_results=False,
    normaliser=normalise_r4,
    description="Any conformant FHIR R4 server (HAPI, Medplum, Aidbox ...).",
)
