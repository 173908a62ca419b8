"""FHIR search semantics for resources the sidecar holds itself (the HL7 v2 results), as an EHR would apply them.

The tools send an EHR the same query whatever the source: ``patient``, a date parameter (``ge…``/``le…``),
``category`` and ``code`` tokens, and ``_sort``/``_count``. Resources that did not come from the EHR (HL7 v2
results converted here) must obey that query exactly as the EHR's own results do, so this module applies it:

* date (``date`` for Observation, ``date`` for DiagnosticReport): the FHIR prefixes ``eq ne gt lt ge le sa eb
  ap`` over ranges, each value taken at its own precision (``2024`` is the whole year). The resource's range
  is its ``effectiveDateTime``/``effectiveInstant``/``effectivePeriod``. A search value without a time is a
  calendar date: it is compared with the resource's own local date (the lab's wall clock), so that a result
  taken at 08:00 +10:00 on 1 May is on 1 May. A value with a timezone is compared as an instant. A resource
  with no effective time matches no date filter (as on an EHR). Several values of one parameter all apply
  (AND); commas inside one value are alternatives (OR).
* token (``category``, ``code``): ``code``, ``system|code``, ``|code`` (no system) or ``system|`` against every
  coding of the element.
* ``patient`` is matched by the caller (the results are already the patient's); ``_count`` is paging, done by
  the caller; ``_sort`` orders by date, newest first with ``-date``.

A parameter this module does not understand makes :func:`unsupported` name it, and the caller then serves no
local resources for that search: fewer results, never results that ignore a filter.

Hand-written because no library applies FHIR search to in-memory resources in Python: fhirpy builds queries
for a server, fhir.resources validates models; neither evaluates a search.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

__all__ = ["SEARCH_PARAMETERS", "matches", "ordered", "unsupported"]

# Search parameter → the element it reads, per resource type the local source can hold.
SEARCH_PARAMETERS: Mapping[str, Mapping[str, str]] = {
    "Observation": {"date": "effective", "category": "category", "code": "code"},
    "DiagnosticReport": {"date": "effective", "category": "category", "code": "code"},
}
_CONTROL = frozenset({"patient", "subject", "_count", "_sort"})
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_DATE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True, slots=True)
class _Range:
    """[low, high) at the value's precision; `aware` when the value carried a timezone."""

    low: datetime | None
    high: datetime | None
    aware: bool


def _values(raw: str | Sequence[str]) -> list[str]:
    return [raw] if isinstance(raw, str) else [str(v) for v in raw]


def unsupported(resource_type: str, params: Mapping[str, str | Sequence[str]]) -> list[str]:
    """The parameters of `params` this module cannot apply to `resource_type` (empty: all of them apply)."""
    known = SEARCH_PARAMETERS.get(resource_type)
    if known is None:
        return sorted(params)
    bad = [name for name in params if name not in known and name not in _CONTROL]
    for raw in _values(params.get("_sort", [])):
        if raw.lstrip("-") not in ("date", ""):
            bad.append("_sort")
    for raw in _values(params.get("date", [])):
        if any(_parse_date(_strip_prefix(v)[1]) is None for v in raw.split(",")):
            bad.append("date")
    return sorted(set(bad))


def _strip_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in _PREFIXES and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _parse_date(text: str) -> _Range | None:
    match = _DATE.match(text.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        if hour is None:
            low = datetime(int(year), int(month or 1), int(day or 1))  # a calendar date: no timezone
            if day:
                high = low + timedelta(days=1)
            elif month:
                high = datetime(low.year + (low.month == 12), low.month % 12 + 1, 1)
            else:
                high = datetime(low.year + 1, 1, 1)
            return _Range(low, high, aware=False)
        tz = None
        if zone == "Z":
            tz = UTC
        elif zone:
            sign = 1 if zone[0] == "+" else -1
            tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        low = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), tzinfo=tz)
        step = timedelta(seconds=1) if second is not None else timedelta(minutes=1)
        return _Range(low, low + step, aware=tz is not None)
    except ValueError:
        return None


def _resource_range(resource: Mapping[str, Any]) -> _Range | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if isinstance(resource.get(key), str):
            return _parse_date(resource[key])
    period = resource.get("effectivePeriod")
    if isinstance(period, Mapping):
        start = _parse_date(str(period["start"])) if period.get("start") else None
        end = _parse_date(str(period["end"])) if period.get("end") else None
        if start is None and end is None:
            return None
        return _Range(
            start.low if start else None,
            end.high if end else None,
            aware=bool((start and start.aware) or (end and end.aware)),
        )
    return None


def _as(value: datetime | None, *, aware: bool, zone: Any) -> datetime | None:
    """`value` made comparable: wall-clock (naive) for a calendar search, an instant for an aware one."""
    if value is None:
        return None
    if not aware:
        return value.replace(tzinfo=None)
    return value if value.tzinfo is not None else value.replace(tzinfo=zone)


def _date_matches(prefix: str, search: _Range, target: _Range) -> bool:
    zone = search.low.tzinfo if search.low is not None else UTC
    s_low, s_high = (
        _as(search.low, aware=search.aware, zone=zone),
        _as(search.high, aware=search.aware, zone=zone),
    )
    t_low = _as(target.low, aware=search.aware, zone=zone)
    t_high = _as(target.high, aware=search.aware, zone=zone)
    assert s_low is not None and s_high is not None  # a parsed search value is bounded
    above_low = t_high is None or t_high > s_low  # some of the target lies at or after the search start
    above_high = t_high is None or t_high > s_high
    below_high = t_low is None or t_low < s_high
    below_low = t_low is None or t_low < s_low
    within = t_low is not None and t_high is not None and s_low <= t_low and t_high <= s_high
    if prefix == "eq":
        return within
    if prefix == "ne":
        return not within
    if prefix == "ge":
        return above_low
    if prefix == "gt":
        return above_high
    if prefix == "le":
        return below_high
    if prefix == "lt":
        return below_low
    if prefix == "sa":
        return t_low is not None and t_low >= s_high
    if prefix == "eb":
        return t_high is not None and t_high <= s_low
    return above_low and below_high  # ap: overlaps the value's own range


def _date_filter(resource: Mapping[str, Any], raw: str | Sequence[str]) -> bool:
    target = _resource_range(resource)
    if target is None:
        return False
    for value in _values(raw):  # every value applies
        alternatives = []
        for option in value.split(","):
            prefix, text = _strip_prefix(option.strip())
            search = _parse_date(text)
            alternatives.append(search is not None and _date_matches(prefix, search, target))
        if not any(alternatives):
            return False
    return True


def _codings(element: Any) -> list[Mapping[str, Any]]:
    concepts = element if isinstance(element, list) else [element]
    return [
        coding
        for concept in concepts
        if isinstance(concept, Mapping)
        for coding in concept.get("coding") or []
        if isinstance(coding, Mapping)
    ]


def _token_matches(token: str, codings: list[Mapping[str, Any]]) -> bool:
    if "|" in token:
        system, code = token.split("|", 1)
        for coding in codings:
            if system == "" and coding.get("system") is None and coding.get("code") == code:
                return True
            if system and coding.get("system") == system and (code == "" or coding.get("code") == code):
                return True
        return False
    return any(coding.get("code") == token for coding in codings)


def _token_filter(resource: Mapping[str, Any], element: str, raw: str | Sequence[str]) -> bool:
    codings = _codings(resource.get(element))
    return all(
        any(_token_matches(t.strip(), codings) for t in value.split(",") if t.strip())
        for value in _values(raw)
    )


def matches(resource: Mapping[str, Any], params: Mapping[str, str | Sequence[str]]) -> bool:
    """`resource` meets every filter of `params` (call :func:`unsupported` first: unknown ones are ignored here)."""
    known = SEARCH_PARAMETERS.get(str(resource.get("resourceType")), {})
    for name, raw in params.items():
        element = known.get(name)
        if element is None:
            continue
        if element == "effective":
            if not _date_filter(resource, raw):
                return False
        elif not _token_filter(resource, element, raw):
            return False
    return True


def _stamp(resource: Mapping[str, Any]) -> float | None:
    found = _resource_range(resource)
    low = found.low if found is not None else None
    if low is None:
        return None
    return (low if low.tzinfo is not None else low.replace(tzinfo=UTC)).timestamp()


def ordered(
    resources: Sequence[dict[str, Any]], params: Mapping[str, str | Sequence[str]]
) -> list[dict[str, Any]]:
    """Newest first (``_sort=-date``, and the default), oldest first with ``_sort=date``; undated last; then by id.

    A stable order, so that a continuation's offset points at the same resource on the next call.
    """
    ascending = "date" in _values(params.get("_sort", []))

    def key(resource: dict[str, Any]) -> tuple[bool, float, str]:
        stamp = _stamp(resource)
        if stamp is None:
            return (True, 0.0, str(resource.get("id", "")))
        return (False, stamp if ascending else -stamp, str(resource.get("id", "")))

    return sorted(resources, key=key)
