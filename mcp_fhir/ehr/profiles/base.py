"""What a backend profile is: a declarative description plus a pure normaliser to FHIR R4.

A :class:`Profile` says which FHIR version a backend speaks, how its searches name the patient, whether every
search must carry a patient, its default rate limit and whether it can deliver HL7 v2 results. Its
:meth:`Profile.normalise` turns one vendor resource into a :class:`Normalised`: the R4-shaped resource (with
``meta.lastUpdated`` and ``meta.security`` kept so freshness and labels survive), the vendor fields we lift
out into ``extras`` and the element paths that had no R4 mapping in ``unmapped``. Normalisers are pure and
never raise on a missing extension or element; they raise :class:`UpstreamBadResponse` only when the input
is not a FHIR resource at all.

Profiles describe; they never decide. Policy (roles, purposes, scopes, labels) lives in Rego.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp_fhir._exceptions import ConfigError, InvalidArgument, UpstreamBadResponse

__all__ = [
    "DEFAULT_PATIENT_SEARCH_PARAM",
    "FHIR_R4",
    "FHIR_STU3",
    "PATIENT_SCOPED_TYPES",
    "US_CORE_BIRTHSEX",
    "US_CORE_ETHNICITY",
    "US_CORE_RACE",
    "Normalised",
    "Normaliser",
    "Profile",
    "common_extras",
    "ensure_resource",
    "extension_code",
    "extension_value",
    "find_extension",
    "first_code",
    "identifier_type_codes",
    "identifier_typed",
    "identifiers_of",
    "omb_extension",
    "pick_identifier",
    "us_core_demographics",
]

FHIR_R4 = "4.0.1"
FHIR_STU3 = "3.0.2"
MAX_RATE_LIMIT_PER_MINUTE = 100_000
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

# The resource types the tools expose, and the search parameter that names the patient on each.
PATIENT_SCOPED_TYPES: tuple[str, ...] = (
    "AllergyIntolerance",
    "Condition",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "Immunization",
    "MedicationRequest",
    "MedicationStatement",
    "Observation",
    "Procedure",
)
DEFAULT_PATIENT_SEARCH_PARAM: Mapping[str, str] = {name: "patient" for name in PATIENT_SCOPED_TYPES}
# Parameters that pin a search to one patient (or to known resources) well enough for backends that demand it.
_PATIENT_PINNING_PARAMS = frozenset({"patient", "subject", "_id"})


@dataclass(frozen=True)
class Normalised:
    """One normalised resource: R4 shape, lifted vendor fields, and what could not be mapped."""

    resource: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # resources hold PHI: never print them
        rtype = self.resource.get("resourceType", "?")
        return (
            f"Normalised(resourceType={rtype!r}, extras={sorted(self.extras)}, unmapped={len(self.unmapped)})"
        )


Normaliser = Callable[[dict[str, Any]], Normalised]


def _identity(resource: dict[str, Any]) -> Normalised:
    return Normalised(resource=resource, extras=common_extras(resource), unmapped=[])


@dataclass(frozen=True)
class Profile:
    """A backend flavour. Build one per backend at start-up; it is immutable and safe to share."""

    name: str
    fhir_version: str
    default_rate_limit_per_minute: int | None
    requires_patient_param: bool
    patient_search_param: Mapping[str, str]
    supports_hl7v2_results: bool
    normaliser: Normaliser = field(default=_identity, repr=False, compare=False)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("profile.name", "must not be empty")
        if self.fhir_version not in (FHIR_R4, FHIR_STU3):
            raise ConfigError(f"profiles.{self.name}.fhir_version", "must be 4.0.1 or 3.0.2")
        limit = self.default_rate_limit_per_minute
        if limit is not None and not (0 < limit <= MAX_RATE_LIMIT_PER_MINUTE):
            raise ConfigError(
                f"profiles.{self.name}.rate_limit_per_minute",
                f"must be between 1 and {MAX_RATE_LIMIT_PER_MINUTE}",
            )

    def with_rate_limit(self, per_minute: int | None) -> Profile:
        """The same profile with the caller's rate limit (validated like the default)."""
        return dataclasses.replace(self, default_rate_limit_per_minute=per_minute)

    def normalise(self, resource: Mapping[str, Any]) -> Normalised:
        """Turn one vendor resource into R4. Pure: the input is never modified."""
        return self.normaliser(ensure_resource(resource))

    def check_query(self, resource_type: str, params: Mapping[str, str]) -> None:
        """Reject a search this backend would refuse, before it is sent."""
        if not self.requires_patient_param or resource_type == "Patient":
            return
        wanted = self.patient_search_param.get(resource_type, "patient")
        present = {key for key, value in params.items() if value not in (None, "")}
        if wanted not in present and not (present & _PATIENT_PINNING_PARAMS):
            raise InvalidArgument(
                "patient", f"the {self.name} backend requires '{wanted}' on {resource_type} searches"
            )


def ensure_resource(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``resource`` after checking it is a FHIR resource at all."""
    if not isinstance(resource, Mapping):
        raise UpstreamBadResponse("the backend returned something that is not a FHIR resource")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise UpstreamBadResponse("the backend returned a resource without a resourceType")
    return copy.deepcopy(dict(resource))


def common_extras(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Fields every profile reports: the backend's id and when the resource last changed."""
    extras: dict[str, Any] = {}
    meta = resource.get("meta")
    if isinstance(meta, Mapping) and isinstance(meta.get("lastUpdated"), str):
        extras["last_updated"] = meta["lastUpdated"]
    if isinstance(resource.get("id"), str):
        extras["backend_id"] = resource["id"]
    return extras


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def find_extension(element: Mapping[str, Any], *urls: str) -> Mapping[str, Any] | None:
    """The first extension on ``element`` whose url is one of ``urls``; None when absent."""
    for ext in _dicts(element.get("extension")):
        if ext.get("url") in urls:
            return ext
    return None


def extension_value(ext: Mapping[str, Any] | None) -> Any:
    """The ``value[x]`` of an extension (or of its nested ``value`` extension); None when absent."""
    if ext is None:
        return None
    for key, value in ext.items():
        if key.startswith("value"):
            return value
    nested = find_extension(ext, "value")
    return extension_value(nested) if nested is not None else None


def identifier_type_codes(identifier: Mapping[str, Any]) -> set[str]:
    """Upper-cased ``type.text`` and ``type.coding.code`` of an identifier."""
    id_type = identifier.get("type")
    if not isinstance(id_type, Mapping):
        return set()
    codes = {str(c.get("code")).upper() for c in _dicts(id_type.get("coding")) if c.get("code")}
    if isinstance(id_type.get("text"), str):
        codes.add(id_type["text"].strip().upper())
    return codes


def identifier_typed(*labels: str) -> Callable[[Mapping[str, Any]], bool]:
    """A ``pick_identifier`` matcher: the identifier's type (text or code, any case) is one of ``labels``."""
    wanted = {label.upper() for label in labels}

    def matches(identifier: Mapping[str, Any]) -> bool:
        return bool(wanted & identifier_type_codes(identifier))

    return matches


def _is_current(identifier: Mapping[str, Any]) -> bool:
    period = identifier.get("period")
    return not (isinstance(period, Mapping) and period.get("end"))


def pick_identifier(
    identifiers: Iterable[Mapping[str, Any]], matches: Callable[[Mapping[str, Any]], bool]
) -> str | None:
    """The value of the best matching identifier: current (no ``period.end``) before ended, then first."""
    found = [
        i for i in identifiers if isinstance(i, Mapping) and isinstance(i.get("value"), str) and matches(i)
    ]
    if not found:
        return None
    found.sort(key=lambda i: (not _is_current(i), i.get("use") == "old"))
    return str(found[0]["value"])


def identifiers_of(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The identifiers of a resource, ignoring anything that is not an object."""
    return _dicts(resource.get("identifier"))


def first_code(value: Any) -> str | None:
    """The first code in a code, Coding or CodeableConcept (falling back to its text); None if none."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        if isinstance(value.get("code"), str):
            return str(value["code"])
        for coding in value.get("coding") or []:
            if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                return str(coding["code"])
        if isinstance(value.get("text"), str):
            return str(value["text"])
    return None


def extension_code(element: Mapping[str, Any], *urls: str) -> str | None:
    """The first code of the value of the first extension on ``element`` whose url is one of ``urls``."""
    return first_code(extension_value(find_extension(element, *urls)))


def omb_extension(resource: Mapping[str, Any], url: str) -> dict[str, Any] | None:
    """A US Core OMB-style complex extension (race, ethnicity) as ``{"codes": [...], "text": ...}``."""
    ext = find_extension(resource, url)
    if ext is None:
        return None
    out: dict[str, Any] = {"codes": []}
    for sub in ext.get("extension") or []:
        if not isinstance(sub, Mapping):
            continue
        if sub.get("url") in ("ombCategory", "detailed"):
            code = first_code(sub.get("valueCoding"))
            if code:
                out["codes"].append(code)
        elif sub.get("url") == "text" and isinstance(sub.get("valueString"), str):
            out["text"] = sub["valueString"]
    return out


def us_core_demographics(patient: Mapping[str, Any]) -> dict[str, Any]:
    """US Core birth sex (a code), race and ethnicity (OMB form); a missing extension leaves its key out."""
    extras: dict[str, Any] = {}
    birth_sex = extension_code(patient, US_CORE_BIRTHSEX)
    if birth_sex is not None:
        extras["birth_sex"] = birth_sex
    for key, url in (("race", US_CORE_RACE), ("ethnicity", US_CORE_ETHNICITY)):
        omb = omb_extension(patient, url)
        if omb is not None:
            extras[key] = omb
    return extras
