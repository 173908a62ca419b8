"""Generic enforcement of a decision's obligations on FHIR resources.

This module knows FHIR shapes, not policy: it removes resources whose `meta.security`
codes the decision excludes, keeps only the categories it allows, drops what is older
than the lookback, deletes redacted elements, and caps the count, whatever values the
policy chose. Anything it cannot prove is allowed (no category where categories are
restricted, no date where a lookback applies) is withheld: enforcement fails closed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mcp_fhir.policy.engine import Obligations

# The element that dates each resource type's clinical event, in order of preference.
CLINICAL_DATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "Condition": ("recordedDate", "onsetDateTime", "onsetPeriod.start"),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "MedicationRequest": ("authoredOn",),
    "Encounter": ("period.start",),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "AllergyIntolerance": ("recordedDate", "onsetDateTime"),
    "DocumentReference": ("date", "context.period.start"),
    "Immunization": ("occurrenceDateTime", "recorded"),
}
# Types whose records are not events in time: a lookback does not apply to them.
UNDATED_TYPES = frozenset({"Patient"})


@dataclass(frozen=True, slots=True)
class Enforced:
    """What survived enforcement, and how much was withheld and why (counts only, no PHI)."""

    resources: list[dict[str, Any]]
    withheld_label: int = 0
    withheld_category: int = 0
    withheld_lookback: int = 0
    truncated: int = 0
    redacted_elements: int = 0

    @property
    def filtered(self) -> int:
        return self.withheld_label + self.withheld_category + self.withheld_lookback + self.truncated


def security_codes(resource: Mapping[str, Any]) -> set[str]:
    """Every `meta.security` code, bare and as `system|code`."""
    codes: set[str] = set()
    for coding in (resource.get("meta") or {}).get("security") or []:
        if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
            codes.add(coding["code"])
            if coding.get("system"):
                codes.add(f"{coding['system']}|{coding['code']}")
    return codes


def category_codes(resource: Mapping[str, Any]) -> set[str]:
    """Every category code (`category` may be one CodeableConcept or a list of them)."""
    raw = resource.get("category")
    concepts = raw if isinstance(raw, list) else [raw] if isinstance(raw, Mapping) else []
    return {
        c["code"]
        for concept in concepts
        if isinstance(concept, Mapping)
        for c in concept.get("coding") or []
        if isinstance(c, Mapping) and isinstance(c.get("code"), str)
    }


def _get_path(resource: Mapping[str, Any], path: str) -> Any:
    node: Any = resource
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def clinical_date(resource: Mapping[str, Any]) -> datetime | None:
    """The resource's clinical date as an aware UTC datetime, or None when it has none we can read."""
    for path in CLINICAL_DATE_PATHS.get(str(resource.get("resourceType")), ()):
        value = _get_path(resource, path)
        if isinstance(value, str):
            parsed = parse_fhir_datetime(value)
            if parsed is not None:
                return parsed
    return None


def parse_fhir_datetime(value: str) -> datetime | None:
    """A FHIR date, dateTime or instant; partial dates take their earliest instant; naive means UTC."""
    text = value.strip()
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _delete_path(node: Any, parts: list[str]) -> int:
    """Delete the element at `parts` under `node`, descending through lists. Returns how many were removed."""
    if isinstance(node, list):
        return sum(_delete_path(item, parts) for item in node)
    if not isinstance(node, dict) or not parts:
        return 0
    head, rest = parts[0], parts[1:]
    if not rest:
        return 1 if node.pop(head, None) is not None else 0
    return _delete_path(node.get(head), rest)


def redact(resource: dict[str, Any], paths: Iterable[str]) -> int:
    """Delete each `Type.element[.child...]` path that names this resource's type. Mutates `resource`."""
    rtype = resource.get("resourceType")
    removed = 0
    for path in paths:
        head, _, rest = path.partition(".")
        if rest and head in (rtype, "*"):
            removed += _delete_path(resource, rest.split("."))
    return removed


def enforce(
    resources: Iterable[Mapping[str, Any]], obligations: Obligations, *, now: datetime | None = None
) -> Enforced:
    """Apply every obligation to `resources`. Returns copies; the inputs (maybe cached) stay untouched."""
    now = now or datetime.now(UTC)
    cutoff = (
        now - timedelta(days=obligations.max_lookback_days)
        if obligations.max_lookback_days is not None
        else None
    )
    excluded = obligations.exclude_security_labels
    kept: list[dict[str, Any]] = []
    by_label = by_category = by_lookback = redacted = 0
    for resource in resources:
        rtype = str(resource.get("resourceType"))
        if excluded and security_codes(resource) & excluded:
            by_label += 1
            continue
        allowed = obligations.allowed_categories.get(rtype)
        if allowed is not None and not category_codes(resource) & allowed:
            by_category += 1
            continue
        if cutoff is not None and rtype not in UNDATED_TYPES:
            when = clinical_date(resource)
            if when is None or when < cutoff:
                by_lookback += 1
                continue
        copied = copy.deepcopy(dict(resource))
        if obligations.redact:
            redacted += redact(copied, obligations.redact)
        kept.append(copied)
    truncated = 0
    if obligations.max_results is not None and len(kept) > obligations.max_results:
        truncated = len(kept) - obligations.max_results
        kept = kept[: obligations.max_results]
    return Enforced(kept, by_label, by_category, by_lookback, truncated, redacted)
