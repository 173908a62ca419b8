"""Backend profiles: which FHIR a backend speaks and how its resources become R4.

get_profile("cerner")                       -> Profile
detect_fhir_version(capability_statement)   -> "4.0.1" | "3.0.2"
profile_for_version("3.0.2")                -> the generic profile for that version
profile.check_query(resource_type, params)  -> None or InvalidArgument
profile.normalise(resource)                 -> Normalised(resource, extras, unmapped)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcp_fhir._exceptions import ConfigError, UpstreamBadResponse
from mcp_fhir.ehr.profiles.au_gp import AU_GP_ALIASES, AU_GP_PROFILE
from mcp_fhir.ehr.profiles.base import FHIR_R4, FHIR_STU3, Normalised, Profile
from mcp_fhir.ehr.profiles.cerner import CERNER_PROFILE
from mcp_fhir.ehr.profiles.epic import EPIC_PROFILE
from mcp_fhir.ehr.profiles.r4 import R4_PROFILE
from mcp_fhir.ehr.profiles.stu3 import STU3_PROFILE

__all__ = [
    "FHIR_R4",
    "FHIR_STU3",
    "PROFILES",
    "Normalised",
    "Profile",
    "detect_fhir_version",
    "get_profile",
    "profile_for_version",
]

PROFILES: Mapping[str, Profile] = {
    p.name: p for p in (R4_PROFILE, EPIC_PROFILE, CERNER_PROFILE, STU3_PROFILE, AU_GP_PROFILE, *AU_GP_ALIASES)
}
# CapabilityStatement.fhirVersion values we accept, by release (patch versions of a release are compatible).
_RELEASES: Mapping[str, str] = {"4.0": FHIR_R4, "3.0": FHIR_STU3}


def get_profile(name: str) -> Profile:
    """The profile registered under ``name``; ConfigError naming ``backends.<x>.profile`` otherwise."""
    try:
        return PROFILES[name]
    except (KeyError, TypeError) as exc:
        raise ConfigError("backend.profile", f"unknown profile; expected one of {sorted(PROFILES)}") from exc


def detect_fhir_version(capability_statement: Mapping[str, Any]) -> str:
    """The FHIR version a server speaks, from its ``/metadata`` CapabilityStatement (``4.0.1`` or ``3.0.2``).

    Any 4.0.x maps to 4.0.1 and any 3.0.x to 3.0.2. A missing, malformed or unsupported version
    (DSTU2, R4B, R5) is an ``UpstreamBadResponse``: we do not guess how to read a server.
    """
    if not isinstance(capability_statement, Mapping):
        raise UpstreamBadResponse("the /metadata answer is not a JSON object")
    if capability_statement.get("resourceType") not in ("CapabilityStatement", "Conformance"):
        raise UpstreamBadResponse("the /metadata answer is not a CapabilityStatement")
    version = capability_statement.get("fhirVersion")
    if not isinstance(version, str):
        raise UpstreamBadResponse("the CapabilityStatement has no fhirVersion")
    release = ".".join(version.strip().split(".")[:2])
    if release not in _RELEASES:
        raise UpstreamBadResponse(
            "the CapabilityStatement names an unsupported fhirVersion", fhir_version=version[:16]
        )
    return _RELEASES[release]


def profile_for_version(fhir_version: str) -> Profile:
    """The generic profile for a detected FHIR version (``r4`` or ``stu3``)."""
    if fhir_version == FHIR_R4:
        return R4_PROFILE
    if fhir_version == FHIR_STU3:
        return STU3_PROFILE
    raise ConfigError("backend.fhir_version", "must be 4.0.1 or 3.0.2")
