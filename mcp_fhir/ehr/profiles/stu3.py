"""FHIR STU3 (3.0.x) → R4 (4.0.1), for every resource type the tools expose.

Guided by the official R3→R4 StructureMaps (``<type>-version-maps.html`` in the R4 spec). Anything STU3 holds
that R4 cannot hold is removed from the resource and its element path is listed in ``Normalised.unmapped``;
where a dropped value matters clinically it is also kept in ``extras`` (``stu3_taken``,
``abatement_boolean``).

Per type (besides the code-system renames below, applied to every ``system`` in the resource):

* Patient: ``animal`` → unmapped.
* Observation: ``context`` → ``encounter`` (EpisodeOfCare → unmapped); ``interpretation`` (and component's) →
  list, v2-0078 codes → v3-ObservationInterpretation; ``comment`` → ``note``; ``related`` has-member /
  derived-from → ``hasMember`` / ``derivedFrom``, other types unmapped; ``valueAttachment`` unmapped.
* Condition: ``clinicalStatus`` / ``verificationStatus`` codes → CodeableConcepts (condition-clinical /
  condition-ver-status; STU3 ``unknown`` has no R4 code → unmapped); ``assertedDate`` → the R4 standard
  extension ``condition-assertedDate``; ``context`` → ``encounter``; ``stage`` → list; ``abatementBoolean`` →
  unmapped (R4 has no boolean abatement).
* AllergyIntolerance: status codes → CodeableConcepts (allergyintolerance-clinical / -verification);
  ``assertedDate`` → ``recordedDate``; ``reaction.certainty`` → unmapped.
* MedicationStatement: ``taken`` → unmapped (R4 removed it; status is kept as sent, exactly as the official R4
  twin of the spec example does); ``reasonNotTaken`` → ``statusReason``; dosage dose/rate → ``doseAndRate``;
  contained Medication converted (``ingredient.amount`` → ``strength``, ``package.batch`` → ``batch``,
  ``isBrand`` / ``isOverTheCounter`` / ``package.container`` / ``image`` → unmapped).
* MedicationRequest: ``context`` → ``encounter``; ``requester.agent`` → ``requester`` (``onBehalfOf``
  unmapped); ``category`` → list; ``definition`` unmapped; ``substitution.allowed`` → ``allowedBoolean``;
  dosage as above.
* Encounter: ``class`` Coding and ``status`` unchanged; ``reason`` → ``reasonCode``; ``incomingReferral`` →
  ``basedOn``; ``diagnosis.role`` → ``diagnosis.use``.
* Procedure: ``notDone: true`` → ``status: not-done``; ``notDoneReason`` → ``statusReason``; ``suspended`` →
  ``on-hold``, ``aborted`` → ``stopped``; ``context`` → ``encounter``; ``performer.role`` → ``function``;
  ``definition`` unmapped.
* DocumentReference: ``class`` → ``category``; ``indexed`` → ``date``; ``created`` → the cross-version
  extension ``http://hl7.org/fhir/3.0/StructureDefinition/extension-DocumentReference.created``
  (as the official map does); ``context.encounter`` → list; ``context.related`` → list of References.
* Any other type is passed through with only the code-system renames, and its type name is listed in
  ``unmapped`` so callers know it was not converted element by element.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mcp_fhir._exceptions import UpstreamBadResponse
from mcp_fhir.ehr.profiles.base import (
    DEFAULT_PATIENT_SEARCH_PARAM,
    FHIR_STU3,
    Normalised,
    Profile,
    common_extras,
)

__all__ = ["STU3_PROFILE", "normalise_stu3", "rewrite_code_system"]

TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"
CONDITION_CLINICAL = TERMINOLOGY + "condition-clinical"
CONDITION_VER_STATUS = TERMINOLOGY + "condition-ver-status"
ALLERGY_CLINICAL = TERMINOLOGY + "allergyintolerance-clinical"
ALLERGY_VERIFICATION = TERMINOLOGY + "allergyintolerance-verification"
OBS_INTERPRETATION = TERMINOLOGY + "v3-ObservationInterpretation"
CONDITION_ASSERTED_DATE = "http://hl7.org/fhir/StructureDefinition/condition-assertedDate"
DOCREF_CREATED = "http://hl7.org/fhir/3.0/StructureDefinition/extension-DocumentReference.created"

_V2 = re.compile(r"^http://hl7\.org/fhir/v2/(\d{4})$")
_V3 = re.compile(r"^http://hl7\.org/fhir/v3/([A-Za-z]+)$")
# STU3 code systems under http://hl7.org/fhir/ that moved to terminology.hl7.org in R4 (renames mapped).
_MOVED_SYSTEMS: dict[str, str] = {
    "observation-category": "observation-category",
    "condition-category": "condition-category",
    "condition-clinical": "condition-clinical",
    "condition-ver-status": "condition-ver-status",
    "medication-statement-category": "medication-statement-category",
    "medication-request-category": "medicationrequest-category",
    "allergy-clinical-status": "allergyintolerance-clinical",
    "allergy-verification-status": "allergyintolerance-verification",
    "diagnosis-role": "diagnosis-role",
    "data-absent-reason": "data-absent-reason",
    "dose-rate-type": "dose-rate-type",
    "medication-admin-category": "medication-admin-category",
    "encounter-special-arrangements": "encounter-special-arrangements",
    "encounter-discharge-disposition": "discharge-disposition",
    "encounter-admit-source": "admit-source",
}
_VER_STATUS_R4 = frozenset(
    {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}
)
_PROCEDURE_STATUS = {"suspended": "on-hold", "aborted": "stopped"}


def rewrite_code_system(system: str) -> str:
    """The R4 URI of an STU3 code system URI (unchanged when it did not move)."""
    if match := _V2.match(system):
        return f"{TERMINOLOGY}v2-{match.group(1)}"
    if match := _V3.match(system):
        return f"{TERMINOLOGY}v3-{match.group(1)}"
    prefix = "http://hl7.org/fhir/"
    if system.startswith(prefix) and system[len(prefix) :] in _MOVED_SYSTEMS:
        return TERMINOLOGY + _MOVED_SYSTEMS[system[len(prefix) :]]
    return system


def _rewrite_systems(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "system" and isinstance(value, str):
                node[key] = rewrite_code_system(value)
            else:
                _rewrite_systems(value)
    elif isinstance(node, list):
        for item in node:
            _rewrite_systems(item)


class _Converter:
    """One conversion: collects unmapped paths and extras while the per-type rules edit the copy in place."""

    def __init__(self) -> None:
        self.unmapped: list[str] = []
        self.extras: dict[str, Any] = {}

    # -- small moves -------------------------------------------------------------------------------------
    def drop(self, element: dict[str, Any], key: str, path: str) -> Any:
        value = element.pop(key, None)
        element.pop("_" + key, None)
        if value is not None and path not in self.unmapped:
            self.unmapped.append(path)
        return value

    @staticmethod
    def rename(element: dict[str, Any], old: str, new: str) -> None:
        if old in element:
            element[new] = element.pop(old)
        if "_" + old in element:
            element["_" + new] = element.pop("_" + old)

    @staticmethod
    def listify(element: dict[str, Any], key: str) -> None:
        if key in element and not isinstance(element[key], list):
            element[key] = [element[key]]

    @staticmethod
    def code_to_concept(element: dict[str, Any], key: str, system: str) -> None:
        code = element.get(key)
        if isinstance(code, str):
            element[key] = {"coding": [{"system": system, "code": code}]}

    def context_to_encounter(self, element: dict[str, Any], rtype: str) -> None:
        context = element.pop("context", None)
        if context is None:
            return
        ref = context.get("reference", "") if isinstance(context, dict) else ""
        if isinstance(ref, str) and "EpisodeOfCare/" in ref:
            self.unmapped.append(f"{rtype}.context")
        else:
            element["encounter"] = context

    def dosage(self, dosages: Any) -> None:
        for dosage in dosages if isinstance(dosages, list) else []:
            if not isinstance(dosage, dict):
                continue
            entry = {
                k: dosage.pop(k)
                for k in list(dosage)
                if k.startswith(("dose", "rate")) and k != "doseAndRate"
            }
            if entry:
                dosage["doseAndRate"] = [entry]

    # -- per type ----------------------------------------------------------------------------------------
    def patient(self, r: dict[str, Any]) -> None:
        self.drop(r, "animal", "Patient.animal")

    def observation(self, r: dict[str, Any]) -> None:
        self.context_to_encounter(r, "Observation")
        for holder in [r, *[c for c in r.get("component") or [] if isinstance(c, dict)]]:
            self.listify(holder, "interpretation")
            for concept in holder.get("interpretation") or []:
                for coding in concept.get("coding") or [] if isinstance(concept, dict) else []:
                    if isinstance(coding, dict) and coding.get("system") in (
                        "http://hl7.org/fhir/v2/0078",
                        TERMINOLOGY + "v2-0078",
                    ):
                        coding["system"] = OBS_INTERPRETATION
            self.drop(holder, "valueAttachment", "Observation.valueAttachment")
        comment = r.pop("comment", None)
        if isinstance(comment, str):
            r.setdefault("note", []).append({"text": comment})
        for related in r.pop("related", None) or []:
            kind = related.get("type", "has-member") if isinstance(related, dict) else None
            target = {"has-member": "hasMember", "derived-from": "derivedFrom"}.get(str(kind))
            if target and isinstance(related.get("target"), dict):
                r.setdefault(target, []).append(related["target"])
            elif "Observation.related" not in self.unmapped:
                self.unmapped.append("Observation.related")

    def condition(self, r: dict[str, Any]) -> None:
        self.code_to_concept(r, "clinicalStatus", CONDITION_CLINICAL)
        status = r.get("verificationStatus")
        if isinstance(status, str) and status not in _VER_STATUS_R4:
            self.drop(r, "verificationStatus", "Condition.verificationStatus")
        self.code_to_concept(r, "verificationStatus", CONDITION_VER_STATUS)
        asserted = r.pop("assertedDate", None)
        if isinstance(asserted, str):
            r.setdefault("extension", []).append({"url": CONDITION_ASSERTED_DATE, "valueDateTime": asserted})
        self.context_to_encounter(r, "Condition")
        self.listify(r, "stage")
        abated = self.drop(r, "abatementBoolean", "Condition.abatementBoolean")
        if abated is not None:
            self.extras["abatement_boolean"] = abated

    def allergy(self, r: dict[str, Any]) -> None:
        self.code_to_concept(r, "clinicalStatus", ALLERGY_CLINICAL)
        self.code_to_concept(r, "verificationStatus", ALLERGY_VERIFICATION)
        self.rename(r, "assertedDate", "recordedDate")
        for reaction in r.get("reaction") or []:
            if isinstance(reaction, dict):
                self.drop(reaction, "certainty", "AllergyIntolerance.reaction.certainty")

    def medication(self, r: dict[str, Any]) -> None:
        for key in ("isBrand", "isOverTheCounter", "image"):
            self.drop(r, key, f"Medication.{key}")
        for ingredient in r.get("ingredient") or []:
            if isinstance(ingredient, dict):
                self.rename(ingredient, "amount", "strength")
        package = r.pop("package", None)
        if isinstance(package, dict):
            batches = package.get("batch") or []
            if batches:
                r["batch"] = batches[0]
            if len(batches) > 1 or package.get("container") or package.get("content"):
                self.unmapped.append("Medication.package")

    def medication_statement(self, r: dict[str, Any]) -> None:
        taken = self.drop(r, "taken", "MedicationStatement.taken")
        if taken is not None:
            self.extras["stu3_taken"] = taken
        self.rename(r, "reasonNotTaken", "statusReason")
        self.dosage(r.get("dosage"))

    def medication_request(self, r: dict[str, Any]) -> None:
        self.context_to_encounter(r, "MedicationRequest")
        requester = r.pop("requester", None)
        if isinstance(requester, dict):
            if isinstance(requester.get("agent"), dict):
                r["requester"] = requester["agent"]
            if requester.get("onBehalfOf") is not None:
                self.unmapped.append("MedicationRequest.requester.onBehalfOf")
        self.listify(r, "category")
        self.drop(r, "definition", "MedicationRequest.definition")
        substitution = r.get("substitution")
        if isinstance(substitution, dict):
            self.rename(substitution, "allowed", "allowedBoolean")
        self.dosage(r.get("dosageInstruction"))

    def encounter(self, r: dict[str, Any]) -> None:
        self.rename(r, "reason", "reasonCode")
        self.rename(r, "incomingReferral", "basedOn")
        for diagnosis in r.get("diagnosis") or []:
            if isinstance(diagnosis, dict):
                self.rename(diagnosis, "role", "use")

    def procedure(self, r: dict[str, Any]) -> None:
        not_done = r.pop("notDone", None)
        if not_done is True:
            r["status"] = "not-done"
        self.rename(r, "notDoneReason", "statusReason")
        if r.get("status") in _PROCEDURE_STATUS:
            r["status"] = _PROCEDURE_STATUS[r["status"]]
        self.context_to_encounter(r, "Procedure")
        self.drop(r, "definition", "Procedure.definition")
        for performer in r.get("performer") or []:
            if isinstance(performer, dict):
                self.rename(performer, "role", "function")

    def document_reference(self, r: dict[str, Any]) -> None:
        self.rename(r, "class", "category")
        self.listify(r, "category")
        self.rename(r, "indexed", "date")
        created = r.pop("created", None)
        if isinstance(created, str):
            r.setdefault("extension", []).append({"url": DOCREF_CREATED, "valueDateTime": created})
        context = r.get("context")
        if isinstance(context, dict):
            self.listify(context, "encounter")
            related = context.pop("related", None)
            refs: list[dict[str, Any]] = []
            for item in related or []:
                if not isinstance(item, dict):
                    continue
                ref = dict(item["ref"]) if isinstance(item.get("ref"), dict) else {}
                if isinstance(item.get("identifier"), dict):
                    ref.setdefault("identifier", item["identifier"])
                if ref:
                    refs.append(ref)
            if refs:
                context["related"] = refs

    # -- dispatch ----------------------------------------------------------------------------------------
    def convert(self, r: dict[str, Any]) -> None:
        rules: dict[str, Callable[[dict[str, Any]], None]] = {
            "Patient": self.patient,
            "Observation": self.observation,
            "Condition": self.condition,
            "AllergyIntolerance": self.allergy,
            "Medication": self.medication,
            "MedicationStatement": self.medication_statement,
            "MedicationRequest": self.medication_request,
            "Encounter": self.encounter,
            "Procedure": self.procedure,
            "DocumentReference": self.document_reference,
        }
        rtype = str(r.get("resourceType"))
        rule = rules.get(rtype)
        if rule is None:
            self.unmapped.append(rtype)
        else:
            rule(r)
        for contained in r.get("contained") or []:
            if isinstance(contained, dict) and isinstance(contained.get("resourceType"), str):
                self.convert(contained)


def normalise_stu3(resource: dict[str, Any]) -> Normalised:
    """Convert one STU3 resource (already deep-copied by the caller) to R4."""
    converter = _Converter()
    try:
        converter.convert(resource)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        raise UpstreamBadResponse("an STU3 resource had an element of an unexpected shape") from exc
    _rewrite_systems(resource)
    extras = common_extras(resource)
    extras["source_fhir_version"] = FHIR_STU3
    extras.update(converter.extras)
    return Normalised(resource=resource, extras=extras, unmapped=converter.unmapped)


STU3_PROFILE = Profile(
    name="stu3",
    fhir_version=FHIR_STU3,
    default_rate_limit_per_minute=None,
    requires_patient_param=False,
    patient_search_param=DEFAULT_PATIENT_SEARCH_PARAM,
    supports_hl7v2_results=False,
    normaliser=normalise_stu3,
    description="Any FHIR STU3 (3.0.x) server, converted to R4 on read.",
)
