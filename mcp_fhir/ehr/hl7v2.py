"""HL7 v2 ORU^R01 lab results → FHIR R4 Observations and DiagnosticReports (Australian GP systems, other feeds).

    parse_oru_r01(message, *, default_timezone=None) -> list[dict]        one Observation per OBX
    parse_oru_r01_message(message, ...)            -> OruResult           + one DiagnosticReport per OBR,
                                                                            patient identifiers, control id

Parsing: hl7apy (``VALIDATION_LEVEL.TOLERANT``, ``find_groups=False``) reads the segments; if hl7apy rejects a
message that still starts with ``MSH`` (unknown version, odd structure) a permissive ER7 splitter takes over,
because real-world feeds are often not conformant. Components are split on the message's own encoding
characters and escapes (``\\S\\`` ``\\T\\`` ``\\F\\`` ``\\R\\`` ``\\E\\`` ``\\.br\\``) are resolved.

Mapping per OBX:

* ``status`` from OBX-11 (F final, P/R/S preliminary, C corrected, X/N cancelled, D/W entered-in-error,
  I/O registered, U final; absent → unknown).
* ``code`` from OBX-3 (identifier^text^system^alt-id^alt-text^alt-system); ``LN`` → http://loinc.org only
  when the code has LOINC shape (``nnnnn-n``), because some labs label local codes ``LN``; SCT → SNOMED CT;
  I9/I9CDX/I10 → ICD; anything else → ``urn:mcp-fhir:hl7v2:cs:<system>``.
* value from OBX-2/OBX-5: NM → ``valueQuantity`` (``<``/``>`` prefixes become the comparator) with OBX-6 units
  (UCUM system and code only when OBX-6.3 says UCUM); ST/TX/FT → ``valueString``; CE/CWE/CNE →
  ``valueCodeableConcept``; SN → ``valueQuantity`` / ``valueRange`` / ``valueRatio``; DT/TS/DTM →
  ``valueDateTime``; any other type → ``dataAbsentReason`` ``unsupported`` (said, not guessed).
* ``referenceRange`` from OBX-7 (``a - b``, ``< b``, ``> a``; the raw text is always kept),
  ``interpretation`` from OBX-8 (v3-ObservationInterpretation, which reuses the v2 table 0078 codes).
* ``effectiveDateTime`` from OBX-14, else OBR-7; ``issued`` from OBR-22 (only when a timezone is known,
  since ``instant`` needs one). Timezone precedence: the timestamp's own offset, then MSH-7's offset (the HL7
  default for the message), then ``default_timezone`` (an IANA name such as ``Australia/Brisbane``); with
  none of them only the date is kept (FHIR needs an offset on any time), so pass the backend's timezone.
* ``category`` laboratory; ``subject`` ``{"identifier": ...}`` from PID-3 (the MR identifier when there is
  one): the caller maps it through the ID map. ``meta.source`` names the message (MSH-10) and ``meta.tag``
  says it came from HL7 v2.

Structure per OBR (what a microbiology report needs to stay whole; HL7 v2-to-FHIR mapping where it has one):

* a ``DiagnosticReport``: ``code`` the ordered panel (OBR-4); ``identifier`` the filler (OBR-3, type FILL) and
  placer (OBR-2, type PLAC) order numbers, and ``basedOn`` the order (a logical ServiceRequest reference by
  those numbers); ``category`` LAB plus the diagnostic service section (OBR-24, table 0074, e.g. MB);
  ``status`` from OBR-25; ``result`` its Observations;
* the specimen, from SPM (v2.5+: SPM-2 ids, SPM-4 type, SPM-8 site, SPM-17/18 times) or else OBR-15 (with
  OBR-7 collected, OBR-14 received), as a contained ``Specimen`` referenced by the report and by each
  Observation (each carries its own copy, so an Observation read alone still names its specimen);
* each Observation keeps the order (``basedOn`` with the panel as display) and the section as a category;
* OBX-4 sub-IDs link Observations: the OBXs of one OBR that share a sub-ID (``1``, ``1.1``, ``1.2``) are one
  group, e.g. an organism and its quantity, and the group's head ``hasMember`` the others, each of which is
  ``derivedFrom`` the head. A child OBR (a sensitivity panel) for the same order (OBR-29, or the same placer or
  filler number) links its results to the organism: the OBX its OBR-26 names, or else the head of the group
  with the same sub-ID. Sub-IDs group only in a microbiology section or when they are not one value for the
  whole OBR (some labs put ``1`` on every OBX of a chemistry panel).

Bad input raises ``InvalidArgument("message", ...)``; nothing else escapes.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from mcp_fhir._exceptions import ConfigError, InvalidArgument

__all__ = ["MAX_MESSAGE_BYTES", "OruResult", "parse_oru_r01", "parse_oru_r01_message"]

MAX_MESSAGE_BYTES = 2_000_000
MAX_OBSERVATIONS = 5_000
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBS_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
LOCAL_CS = "urn:mcp-fhir:hl7v2:cs:"
LOCAL_ID = "urn:mcp-fhir:hl7v2:id:"
SOURCE_TAG = {
    "system": "urn:mcp-fhir:provenance",
    "code": "hl7v2-oru-r01",
    "display": "Converted from HL7 v2",
}
IHI_SYSTEM = "http://ns.electronichealth.net.au/id/hi/ihi/1.0"
MEDICARE_SYSTEM = "http://ns.electronichealth.net.au/id/medicare-number"
DVA_SYSTEM = "http://ns.electronichealth.net.au/id/dva"

_CODING_SYSTEMS = {
    "SCT": SNOMED,
    "SNOMEDCT": SNOMED,
    "UCUM": UCUM,
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9CDX": "http://hl7.org/fhir/sid/icd-9-cm",
    "I10": "http://hl7.org/fhir/sid/icd-10",
}
_STATUS = {
    "F": "final",
    "U": "final",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "C": "corrected",
    "X": "cancelled",
    "N": "cancelled",
    "D": "entered-in-error",
    "W": "entered-in-error",
    "I": "registered",
    "O": "registered",
}
_INTERPRETATION = {
    "H": "High",
    "HH": "Critical high",
    "L": "Low",
    "LL": "Critical low",
    "N": "Normal",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "<": "Off scale low",
    ">": "Off scale high",
    "S": "Susceptible",
    "R": "Resistant",
    "I": "Intermediate",
    "POS": "Positive",
    "NEG": "Negative",
    "IND": "Indeterminate",
    "DET": "Detected",
    "ND": "Not detected",
    "U": "Significant change up",
    "D": "Significant change down",
    "B": "Better",
    "W": "Worse",
}
_LOINC_SHAPE = re.compile(r"^\d{1,7}-\d$")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_NUMERIC = re.compile(rf"^\s*(<=|>=|<|>)?\s*({_NUMBER})\s*$")
_RANGE = re.compile(rf"^\s*({_NUMBER})\s*(?:-|_|\u2013|to)\s*({_NUMBER})\s*$")
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2}(?:\.\d{1,4})?)?\s*([+-]\d{4})?$")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9\-.]")
_SYSTEM_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$")


@dataclass(frozen=True)
class OruResult:
    """Everything one ORU^R01 carries that the caller needs."""

    observations: list[dict[str, Any]]
    patient_identifiers: list[dict[str, Any]] = field(default_factory=list)
    control_id: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)  # one DiagnosticReport per OBR

    def __repr__(self) -> str:  # observations and identifiers are PHI
        return (
            f"OruResult(observations={len(self.observations)}, reports={len(self.reports)}, "
            f"identifiers={len(self.patient_identifiers)})"
        )


@dataclass(frozen=True)
class _Segment:
    name: str
    fields: Mapping[int, list[str]]  # field number → ER7 text of each repetition

    def get(self, number: int) -> str:
        reps = self.fields.get(number)
        return reps[0] if reps else ""

    def reps(self, number: int) -> list[str]:
        return list(self.fields.get(number, []))


@dataclass(frozen=True)
class _Enc:
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    def components(self, text: str) -> list[str]:
        return text.split(self.component)

    def subcomponents(self, text: str) -> list[str]:
        return text.split(self.subcomponent)

    def unescape(self, text: str) -> str:
        if self.escape not in text:
            return text
        e = re.escape(self.escape)
        table = {"S": "^", "T": "&", "F": "|", "R": "~", "E": "\\", ".br": "\n"}
        return re.sub(rf"{e}(S|T|F|R|E|\.br){e}", lambda m: table[m.group(1)], text)


# -- reading the message ---------------------------------------------------------------------------------


def _decode(message: str | bytes) -> str:
    if isinstance(message, bytes):
        if len(message) > MAX_MESSAGE_BYTES:
            raise InvalidArgument("message", f"must be at most {MAX_MESSAGE_BYTES} bytes")
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError:
            return message.decode("latin-1")
    if not isinstance(message, str):
        raise InvalidArgument("message", "must be HL7 v2 text")
    if len(message) > MAX_MESSAGE_BYTES:
        raise InvalidArgument("message", f"must be at most {MAX_MESSAGE_BYTES} characters")
    return message


def _split_lines(text: str) -> list[str]:
    return [line for line in re.split(r"\r\n|\r|\n", text.strip()) if line.strip()]


def _encoding_from_msh(first_line: str) -> tuple[str, _Enc]:
    if not first_line.startswith("MSH") or len(first_line) < 8:
        raise InvalidArgument("message", "must start with an MSH segment")
    field_sep = first_line[3]
    chars = first_line[4:8]
    if field_sep.isalnum() or len(set(chars + field_sep)) != 5 or any(c.isalnum() for c in chars):
        raise InvalidArgument("message", "MSH must declare five distinct encoding characters")
    return field_sep, _Enc(component=chars[0], repetition=chars[1], escape=chars[2], subcomponent=chars[3])


def _segments_hl7apy(text: str) -> list[_Segment]:
    msg = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    segments: list[_Segment] = []
    for seg in msg.children:
        fields: dict[int, list[str]] = {}
        for fld in seg.children:
            number = int(str(fld.name).rsplit("_", 1)[1])
            fields.setdefault(number, []).append(fld.to_er7())
        segments.append(_Segment(name=str(seg.name), fields=fields))
    return segments


def _segments_permissive(lines: list[str], field_sep: str, enc: _Enc) -> list[_Segment]:
    segments: list[_Segment] = []
    for line in lines:
        parts = line.split(field_sep)
        name = parts[0].strip()
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
            raise InvalidArgument("message", "contains a line that is not an HL7 v2 segment")
        fields: dict[int, list[str]] = {}
        # MSH-1 is the field separator itself, so MSH field numbers are shifted by one.
        offset = 1 if name == "MSH" else 0
        if name == "MSH":
            fields[1] = [field_sep]
        for index, value in enumerate(parts[1:], start=1 + offset):
            if value:
                fields[index] = value.split(enc.repetition) if index != 2 or name != "MSH" else [value]
        segments.append(_Segment(name=name, fields=fields))
    return segments


def _read_segments(text: str) -> tuple[list[_Segment], _Enc]:
    lines = _split_lines(text)
    if not lines:
        raise InvalidArgument("message", "is empty")
    field_sep, enc = _encoding_from_msh(lines[0])
    try:
        segments = _segments_hl7apy("\r".join(lines))
    except (HL7apyException, ValueError, IndexError, KeyError, TypeError, AttributeError):
        segments = _segments_permissive(lines, field_sep, enc)
    if not segments or segments[0].name != "MSH":
        raise InvalidArgument("message", "must start with an MSH segment")
    return segments, enc


# -- value helpers ---------------------------------------------------------------------------------------


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)


def _tz_from_offset(offset: str) -> str:
    return f"{offset[:3]}:{offset[3:]}"


@dataclass(frozen=True)
class _Clock:
    """Timezone context for one message: MSH-7's offset, else the caller's zone."""

    msh_offset: str | None
    zone: ZoneInfo | None

    def datetime(self, ts: str, *, instant: bool = False) -> str | None:
        match = _TS.match(ts.strip())
        if not match:
            return None
        year, month, day, hour, minute, second, offset = match.groups()
        if hour is None or minute is None:
            return None if instant else "-".join(p for p in (year, month, day) if p)
        sec = second or "00"
        local = f"{year}-{month}-{day}T{hour}:{minute}:{sec}"
        if not (month and day):
            return None
        try:
            datetime.fromisoformat(local.split(".")[0])
        except ValueError:
            return None
        offset = offset or self.msh_offset
        if offset:
            return local + _tz_from_offset(offset)
        if self.zone is not None:
            aware = datetime.fromisoformat(local.split(".")[0]).replace(tzinfo=self.zone)
            return local + aware.isoformat()[-6:]
        # FHIR requires an offset on any dateTime with a time; without one we keep only the date.
        return None if instant else f"{year}-{month}-{day}"


def _coding(enc: _Enc, identifier: str, text: str, system: str) -> dict[str, Any] | None:
    code = enc.unescape(identifier).strip()
    display = enc.unescape(text).strip()
    sys_name = system.strip()
    if not code:
        return None
    if sys_name == "LN" and _LOINC_SHAPE.match(code):
        uri = LOINC
    elif sys_name in _CODING_SYSTEMS:
        uri = _CODING_SYSTEMS[sys_name]
    else:
        # A "system" that is not a table-0396 style token (e.g. a LOINC long name) is treated as local.
        token = sys_name if _SYSTEM_TOKEN.match(sys_name) else "local"
        label = "LN-nonconformant" if sys_name == "LN" else token
        uri = LOCAL_CS + urllib.parse.quote(label, safe="")
    coding: dict[str, Any] = {"system": uri, "code": code}
    if display:
        coding["display"] = display
    return coding


def _concept(enc: _Enc, ce: str) -> dict[str, Any] | None:
    parts = enc.components(ce) + [""] * 6
    codings = [c for c in (_coding(enc, *parts[0:3]), _coding(enc, *parts[3:6])) if c]
    text = enc.unescape(parts[1]).strip() or enc.unescape(parts[4]).strip()
    if not codings and not text:
        return None
    concept: dict[str, Any] = {}
    if codings:
        concept["coding"] = codings
    if text:
        concept["text"] = text
    return concept


def _units(enc: _Enc, obx6: str) -> dict[str, Any]:
    parts = [*enc.components(obx6), "", "", ""]
    code = enc.unescape(parts[0]).strip()
    if not code:
        return {}
    units: dict[str, Any] = {"unit": code}
    if parts[2].strip().upper() == "UCUM":
        units.update(system=UCUM, code=code)
    return units


def _quantity(value: str, units: Mapping[str, Any], comparator: str | None = None) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": _number(value), **units}
    if comparator:
        quantity["comparator"] = comparator
    return quantity


def _value(enc: _Enc, clock: _Clock, vtype: str, reps: list[str], units: dict[str, Any]) -> dict[str, Any]:
    raw = reps[0] if reps else ""
    if not raw.strip():
        return {}
    if vtype == "NM":
        match = _NUMERIC.match(enc.unescape(raw))
        if match:
            return {"valueQuantity": _quantity(match.group(2), units, match.group(1))}
        return {"valueString": enc.unescape(raw).strip()}
    if vtype in ("ST", "TX", "FT"):
        return {"valueString": "\n".join(enc.unescape(r) for r in reps).strip()}
    if vtype in ("CE", "CWE", "CNE"):
        concept = _concept(enc, raw)
        return {"valueCodeableConcept": concept} if concept else {}
    if vtype == "SN":
        return _structured_numeric(enc, raw, units)
    if vtype in ("DT", "TS", "DTM"):
        when = clock.datetime(enc.components(raw)[0])
        return {"valueDateTime": when} if when else {"valueString": enc.unescape(raw).strip()}
    return {
        "dataAbsentReason": {
            "coding": [{"system": DATA_ABSENT, "code": "unsupported", "display": "Unsupported"}],
            "text": f"HL7 v2 value type {vtype[:8] or '(none)'} has no FHIR mapping",
        }
    }


def _structured_numeric(enc: _Enc, raw: str, units: dict[str, Any]) -> dict[str, Any]:
    comparator, num1, separator, num2 = [*(p.strip() for p in enc.components(raw)), "", "", "", ""][:4]
    try:
        if num1 and separator in ("-", "") and num2:
            return {"valueRange": {"low": _quantity(num1, units), "high": _quantity(num2, units)}}
        if num1 and separator in (":", "/") and num2:
            return {
                "valueRatio": {"numerator": _quantity(num1, units), "denominator": {"value": _number(num2)}}
            }
        if num1 and not num2:
            cmp = comparator if comparator in ("<", ">", "<=", ">=") else None
            return {"valueQuantity": _quantity(num1, units, cmp)}
    except ValueError:
        pass
    return {"valueString": enc.unescape(raw).strip()}


def _reference_range(enc: _Enc, obx7: str, units: dict[str, Any]) -> list[dict[str, Any]]:
    text = enc.unescape(obx7).strip()
    if not text:
        return []
    ref: dict[str, Any] = {}
    if match := _RANGE.match(text):
        ref = {"low": _quantity(match.group(1), units), "high": _quantity(match.group(2), units)}
    elif match := _NUMERIC.match(text):
        comparator, value = match.groups()
        if comparator in ("<", "<="):
            ref = {"high": _quantity(value, units)}
        elif comparator in (">", ">="):
            ref = {"low": _quantity(value, units)}
    ref["text"] = text
    return [ref]


def _interpretation(enc: _Enc, obx8_reps: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rep in obx8_reps:
        code = enc.unescape(enc.components(rep)[0]).strip()
        if not code:
            continue
        if code in _INTERPRETATION:
            coding = {"system": OBS_INTERPRETATION, "code": code, "display": _INTERPRETATION[code]}
            out.append({"coding": [coding]})
        else:
            out.append({"text": code})
    return out


def _patient_identifier(enc: _Enc, cx: str) -> dict[str, Any] | None:
    parts = enc.components(cx) + [""] * 5
    value = enc.unescape(parts[0]).strip()
    if not value:
        return None
    authority = enc.subcomponents(parts[3])
    namespace = enc.unescape(authority[0]).strip()
    universal = authority[1].strip() if len(authority) > 1 else ""
    universal_type = authority[2].strip().upper() if len(authority) > 2 else ""
    id_type = enc.unescape(parts[4]).strip().upper()
    if namespace.upper().startswith("AUSHIC") and id_type == "NI":
        system = IHI_SYSTEM
    elif namespace.upper() == "AUSHIC" and id_type == "MC":
        system = MEDICARE_SYSTEM
    elif namespace.upper() == "AUSDVA":
        system = DVA_SYSTEM
    elif universal and universal_type == "ISO":
        system = f"urn:oid:{universal}"
    else:
        system = LOCAL_ID + urllib.parse.quote(namespace or "unknown", safe="")
    identifier: dict[str, Any] = {"system": system, "value": value}
    if id_type:
        identifier["type"] = {"coding": [{"system": V2_0203, "code": id_type}]}
    if namespace:
        identifier["assigner"] = {"display": namespace}
    return identifier


def _fhir_id(*parts: str) -> str:
    joined = "-".join(_ID_UNSAFE.sub("-", p) for p in parts if p)
    return joined[-64:].lstrip("-.") or "obx"


# -- orders, specimens and links (microbiology keeps its structure) --------------------------------------


def _ei(enc: _Enc, parts: list[str], type_code: str) -> dict[str, Any] | None:
    """An order number (EI: entity id, namespace id, universal id, universal id type) as an Identifier."""
    parts = [*parts, "", "", "", ""]
    value = enc.unescape(parts[0]).strip()
    if not value:
        return None
    namespace = enc.unescape(parts[1]).strip()
    universal, universal_type = parts[2].strip(), parts[3].strip().upper()
    identifier: dict[str, Any] = {"type": {"coding": [{"system": V2_0203, "code": type_code}]}}
    if universal and universal_type == "ISO":
        identifier["system"] = f"urn:oid:{universal}"
    elif namespace:
        identifier["system"] = LOCAL_ID + urllib.parse.quote(namespace, safe="")
    identifier["value"] = value
    if namespace:
        identifier["assigner"] = {"display": namespace}
    return identifier


@dataclass(frozen=True)
class _Order:
    """One OBR: its order numbers, panel, specimen and parent (for a child OBR such as a sensitivity panel)."""

    index: int
    placer: dict[str, Any] | None
    filler: dict[str, Any] | None
    panel: dict[str, Any] | None
    specimen: dict[str, Any] | None
    section: str  # OBR-24, the diagnostic service section (MB: microbiology)
    parent_numbers: tuple[str, str]  # OBR-29: the parent order's placer and filler numbers
    parent_result: tuple[str, str]  # OBR-26: the parent OBX's OBX-3 code and OBX-4 sub-ID

    @property
    def numbers(self) -> tuple[str, str]:
        return (
            str((self.placer or {}).get("value", "")),
            str((self.filler or {}).get("value", "")),
        )

    def based_on(self) -> list[dict[str, Any]]:
        """Logical references to the order (a ServiceRequest) by its placer and filler numbers."""
        refs = []
        for identifier in (self.placer, self.filler):
            if identifier is not None:
                ref: dict[str, Any] = {"type": "ServiceRequest", "identifier": dict(identifier)}
                if self.panel and self.panel.get("text"):
                    ref["display"] = self.panel["text"]
                refs.append(ref)
        return refs


def _specimen(enc: _Enc, clock: _Clock, obr: _Segment, spm: _Segment | None) -> dict[str, Any] | None:
    """The specimen: SPM (v2.5+) when present, else OBR-15 (specimen source), with OBR-7/OBR-14 times."""
    specimen: dict[str, Any] = {"resourceType": "Specimen", "id": "specimen"}
    collected = obr.get(7)
    received = obr.get(14)
    if spm is not None:
        ids = [*enc.components(spm.get(2)), ""]
        for number, type_code in ((0, "PLAC"), (1, "FILL")):
            ident = _ei(enc, enc.subcomponents(ids[number]), type_code) if ids[number] else None
            if ident:
                specimen.setdefault("identifier", []).append(ident)
        if kind := _concept(enc, spm.get(4)):
            specimen["type"] = kind
        if site := _concept(enc, spm.get(8)):
            specimen["collection"] = {"bodySite": site}
        collected = enc.components(spm.get(17))[0] or collected
        received = spm.get(18) or received
    elif obr.get(15):
        source = enc.components(obr.get(15)) + [""] * 5
        if kind := _concept(enc, enc.component.join(enc.subcomponents(source[0]))):
            specimen["type"] = kind
        if site := _concept(enc, enc.component.join(enc.subcomponents(source[3]))):
            specimen["collection"] = {"bodySite": site}
    else:
        return None
    when = clock.datetime(enc.components(collected)[0]) if collected else None
    if when:
        specimen.setdefault("collection", {})["collectedDateTime"] = when
    got = clock.datetime(enc.components(received)[0]) if received else None
    if got:
        specimen["receivedTime"] = got
    return specimen if len(specimen) > 2 else None


def _order(enc: _Enc, clock: _Clock, index: int, obr: _Segment, spm: _Segment | None) -> _Order:
    parent = [*enc.components(obr.get(29)), "", ""]
    parent_result = [*enc.components(obr.get(26)), "", ""]
    return _Order(
        index=index,
        placer=_ei(enc, enc.components(obr.get(2)), "PLAC"),
        filler=_ei(enc, enc.components(obr.get(3)), "FILL"),
        panel=_concept(enc, obr.get(4)),
        specimen=_specimen(enc, clock, obr, spm),
        section=enc.unescape(enc.components(obr.get(24))[0]).strip().upper(),
        parent_numbers=(
            enc.unescape(enc.subcomponents(parent[0])[0]).strip(),
            enc.unescape(enc.subcomponents(parent[1])[0]).strip(),
        ),
        parent_result=(
            enc.unescape(enc.subcomponents(parent_result[0])[0]).strip(),
            enc.unescape(parent_result[1]).strip(),
        ),
    )


def _link(head: dict[str, Any], member: dict[str, Any]) -> None:
    """`member` belongs to `head` (e.g. an organism's quantity or susceptibility): hasMember and derivedFrom."""
    if head is member:
        return
    to_member = {"reference": f"Observation/{member['id']}"}
    to_head = {"reference": f"Observation/{head['id']}"}
    if to_member not in head.setdefault("hasMember", []):
        head["hasMember"].append(to_member)
    if to_head not in member.setdefault("derivedFrom", []):
        member["derivedFrom"].append(to_head)


def _group_key(sub_id: str) -> str:
    return sub_id.split(".", 1)[0].strip()


_MICROBIOLOGY = frozenset({"MB", "MCB", "VR", "MYC", "PAR"})


def _heads(entries: list[tuple[dict[str, Any], str, str]]) -> dict[str, dict[str, Any]]:
    """The head of each OBX-4 group of one OBR: the OBX whose sub-ID is the group key itself, else the first."""
    heads: dict[str, dict[str, Any]] = {}
    for obs, sub_id, _code in entries:
        if sub_id and sub_id == _group_key(sub_id):
            heads.setdefault(sub_id, obs)
    for obs, sub_id, _code in entries:
        if key := _group_key(sub_id):
            heads.setdefault(key, obs)
    return heads


def _grouped(order: _Order, entries: list[tuple[dict[str, Any], str, str]]) -> bool:
    """Sub-IDs group this OBR's OBXs: a microbiology section, or sub-IDs that are not all one value.

    Some labs put sub-ID 1 on every OBX of a chemistry panel; that says nothing about structure.
    """
    sub_ids = {sub_id for _obs, sub_id, _code in entries}
    return order.section in _MICROBIOLOGY or len(sub_ids) > 1


def _link_groups(orders: list[_Order], entries: dict[int, list[tuple[dict[str, Any], str, str]]]) -> None:
    """OBX-4 sub-IDs, OBR-26 and OBR-29 turned into hasMember/derivedFrom links between Observations.

    * Within one OBR, the OBXs that share a sub-ID (``1``, or ``1.1``/``1.2`` under ``1``) are one group,
      e.g. an organism and its quantity: the group's head has the others as members.
    * A child OBR (a sensitivity panel) that names its parent result (OBR-26: OBX-3 code and OBX-4 sub-ID)
      has all its OBXs linked to that OBX of the parent order (OBR-29, else the same order numbers).
    * A child OBR without OBR-26, for the same order (OBR-29, or the same placer or filler number as an
      earlier OBR), links each OBX to the head of the group with the same sub-ID there (AS 4700.2 practice).
    """
    heads = {order.index: _heads(entries.get(order.index, [])) for order in orders}
    grouped = {order.index: _grouped(order, entries.get(order.index, [])) for order in orders}
    to_parent: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (parent OBX, child OBX)
    for position, order in enumerate(orders):
        numbers = order.parent_numbers if any(order.parent_numbers) else order.numbers
        parents = [
            earlier
            for earlier in reversed(orders[:position])
            if any(a and a == b for a, b in zip(numbers, earlier.numbers, strict=True))
        ]
        code, parent_sub = order.parent_result
        if not parents and parent_sub:  # OBR-26 without matching order numbers: the nearest earlier OBR
            parents = list(reversed(orders[:position]))
        for obs, sub_id, _code in entries.get(order.index, []):
            for parent in parents:
                head = None
                if parent_sub:  # OBR-26 names the parent OBX
                    key = _group_key(parent_sub)
                    named = [
                        o
                        for o, s, c in entries.get(parent.index, [])
                        if _group_key(s) == key and (not code or c == code)
                    ]
                    head = named[0] if named else None
                elif grouped[order.index] and grouped[parent.index] and _group_key(sub_id):
                    head = heads[parent.index].get(_group_key(sub_id))
                if head is not None:
                    to_parent.append((head, obs))
                    break
    claimed = {id(child) for _head, child in to_parent}
    for order in orders:  # what no parent claimed groups within its own OBR
        if not grouped[order.index]:
            continue
        for obs, sub_id, _code in entries.get(order.index, []):
            key = _group_key(sub_id)
            if key and id(obs) not in claimed and id(heads[order.index][key]) not in claimed:
                _link(heads[order.index][key], obs)
    for head, child in to_parent:
        _link(head, child)


_REPORT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "R": "preliminary",
    "C": "corrected",
    "F": "final",
    "X": "cancelled",
}
_SECTIONS = {
    "LAB": "Laboratory",
    "MB": "Microbiology",
    "CH": "Chemistry",
    "HM": "Hematology",
    "SR": "Serology",
    "IMM": "Immunology",
    "SP": "Surgical Pathology",
    "CP": "Cytopathology",
    "BLB": "Blood Bank",
    "VR": "Virology",
    "MYC": "Mycology",
    "PAR": "Parasitology",
}


def _section(code: str) -> dict[str, Any]:
    coding = {"system": V2_0074, "code": code}
    if code in _SECTIONS:
        coding["display"] = _SECTIONS[code]
    return {"coding": [coding]}


def _with_order(obs: dict[str, Any], order: _Order) -> None:
    """An Observation keeps its order: placer/filler numbers and panel (basedOn), specimen, section."""
    if based_on := order.based_on():
        obs["basedOn"] = based_on
    if order.section and order.section != "LAB":
        obs["category"].append(_section(order.section))
    if order.specimen is not None:
        obs["contained"] = [dict(order.specimen)]
        obs["specimen"] = {"reference": "#specimen"}


def _report(
    enc: _Enc,
    clock: _Clock,
    obr: _Segment,
    order: _Order,
    meta: dict[str, Any],
    report_id: str,
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """One OBR as a DiagnosticReport: panel, order numbers, specimen, and its Observations as `result`."""
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "meta": {**meta, "tag": [dict(t) for t in meta["tag"]]},
    }
    if order.specimen is not None:
        report["contained"] = [dict(order.specimen)]
    identifiers = [dict(i) for i in (order.filler, order.placer) if i is not None]
    if identifiers:
        report["identifier"] = identifiers
    if based_on := order.based_on():
        report["basedOn"] = based_on
    report["status"] = _REPORT_STATUS.get(enc.components(obr.get(25))[0].strip().upper(), "unknown")
    section = order.section
    report["category"] = [_section("LAB")] + ([_section(section)] if section and section != "LAB" else [])
    report["code"] = order.panel or {"text": "unknown"}
    if results and "subject" in results[0]:
        report["subject"] = dict(results[0]["subject"])
    effective = clock.datetime(enc.components(obr.get(7))[0]) if obr.get(7) else None
    if effective:
        report["effectiveDateTime"] = effective
    issued = clock.datetime(enc.components(obr.get(22))[0], instant=True) if obr.get(22) else None
    if issued:
        report["issued"] = issued
    if order.specimen is not None:
        report["specimen"] = [{"reference": "#specimen"}]
    if results:
        report["result"] = [{"reference": f"Observation/{o['id']}"} for o in results]
    return report


# -- the conversion --------------------------------------------------------------------------------------


def _observation_groups(segments: list[_Segment]) -> Iterator[tuple[_Segment | None, int, _Segment]]:
    obr: _Segment | None = None
    obr_index = 0
    for seg in segments:
        if seg.name == "OBR":
            obr, obr_index = seg, obr_index + 1
        elif seg.name == "OBX":
            yield obr, obr_index, seg


def _zone(default_timezone: str | None) -> ZoneInfo | None:
    if default_timezone is None:
        return None
    try:
        return ZoneInfo(default_timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError("hl7v2.default_timezone", "must be an IANA timezone name") from exc


def _convert(segments: list[_Segment], enc: _Enc, zone: ZoneInfo | None) -> OruResult:
    msh = segments[0]
    message_type = enc.components(msh.get(9))
    if message_type[:2] != ["ORU", "R01"]:
        raise InvalidArgument("message", "must be an ORU^R01 message")
    control_id = enc.unescape(msh.get(10)).strip() or None
    msh7 = _TS.match(enc.components(msh.get(7))[0].strip())
    clock = _Clock(msh_offset=msh7.group(7) if msh7 else None, zone=zone)

    pid = next((s for s in segments if s.name == "PID"), None)
    identifiers = [i for i in (_patient_identifier(enc, r) for r in (pid.reps(3) if pid else [])) if i]
    mrn = next((i for i in identifiers if i.get("type", {}).get("coding", [{}])[0].get("code") == "MR"), None)
    subject_identifier = mrn or (identifiers[0] if identifiers else None)

    meta: dict[str, Any] = {"tag": [dict(SOURCE_TAG)]}
    if control_id:
        meta["source"] = "urn:mcp-fhir:hl7v2:msh-10:" + urllib.parse.quote(control_id, safe="")

    obrs: dict[int, _Segment] = {}
    spms: dict[int, _Segment] = {}
    for seg in segments:
        if seg.name == "OBR":
            obrs[len(obrs) + 1] = seg
        elif seg.name == "SPM" and obrs:
            spms.setdefault(len(obrs), seg)  # the first SPM after an OBR is its specimen
    orders = {i: _order(enc, clock, i, seg, spms.get(i)) for i, seg in obrs.items()}
    entries: dict[int, list[tuple[dict[str, Any], str, str]]] = {}

    observations: list[dict[str, Any]] = []
    for obr, obr_index, obx in _observation_groups(segments):
        if len(observations) >= MAX_OBSERVATIONS:
            raise InvalidArgument("message", f"must carry at most {MAX_OBSERVATIONS} OBX segments")
        units = _units(enc, obx.get(6))
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": _fhir_id(control_id or "msg", str(obr_index), obx.get(1) or str(len(observations) + 1)),
            "meta": {**meta, "tag": [dict(t) for t in meta["tag"]]},
            "status": _STATUS.get(enc.components(obx.get(11))[0].strip().upper(), "unknown"),
            "category": [
                {"coding": [{"system": OBS_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}
            ],
            "code": _concept(enc, obx.get(3)) or {"text": "unknown"},
        }
        if subject_identifier is not None:
            obs["subject"] = {"identifier": dict(subject_identifier)}
        effective = clock.datetime(enc.components(obx.get(14))[0]) if obx.get(14) else None
        if effective is None and obr is not None and obr.get(7):
            effective = clock.datetime(enc.components(obr.get(7))[0])
        if effective:
            obs["effectiveDateTime"] = effective
        issued = clock.datetime(enc.components(obr.get(22))[0], instant=True) if obr and obr.get(22) else None
        if issued:
            obs["issued"] = issued
        obs.update(_value(enc, clock, obx.get(2).strip().upper(), obx.reps(5), units))
        if interpretation := _interpretation(enc, obx.reps(8)):
            obs["interpretation"] = interpretation
        if reference_range := _reference_range(enc, obx.get(7), units):
            obs["referenceRange"] = reference_range
        if (order := orders.get(obr_index)) is not None:
            _with_order(obs, order)
            code = enc.unescape(enc.components(obx.get(3))[0]).strip()
            entries.setdefault(obr_index, []).append((obs, enc.unescape(obx.get(4)).strip(), code))
        observations.append(obs)
    _link_groups(list(orders.values()), entries)
    reports = [
        _report(
            enc,
            clock,
            obrs[i],
            order,
            meta,
            _fhir_id(control_id or "msg", str(i), "report"),
            [obs for obs, _sub, _code in entries.get(i, [])],
        )
        for i, order in orders.items()
    ]
    return OruResult(
        observations=observations, patient_identifiers=identifiers, control_id=control_id, reports=reports
    )


def parse_oru_r01_message(message: str | bytes, *, default_timezone: str | None = None) -> OruResult:
    """Parse one ORU^R01 into Observations plus the PID-3 identifiers and MSH-10 control id."""
    zone = _zone(default_timezone)
    text = _decode(message)
    try:
        segments, enc = _read_segments(text)
        return _convert(segments, enc, zone)
    except InvalidArgument:
        raise
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise InvalidArgument("message", "is not a readable ORU^R01 message") from exc


def parse_oru_r01(message: str | bytes, *, default_timezone: str | None = None) -> list[dict[str, Any]]:
    """One FHIR R4 Observation (a dict) per OBX of an ORU^R01 message."""
    return parse_oru_r01_message(message, default_timezone=default_timezone).observations
