"""The HL7 v2 fallback for results: a drop folder of ORU^R01 messages, served as FHIR Observations.

Australian GP systems often export pathology as HL7 v2 files rather than FHIR. A backend that sets
`hl7v2_results_dir` gets its Observation and DiagnosticReport searches completed from that folder: each
message is parsed once (re-parsed when the file changes), and a message belongs to a patient when one of
its PID identifiers equals the patient's id on that backend. :meth:`Hl7ResultsSource.search` applies the
search's own filters (date, category, code: ``ehr/local_search.py``) and orders the results, so the EHR
client can page them after the EHR's own (``ehr/client.py``). Policy and obligations apply to these
resources exactly as to any other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp_fhir._exceptions import MCPFhirError
from mcp_fhir.ehr.hl7v2 import parse_oru_r01_message
from mcp_fhir.ehr.local_search import matches, ordered, unsupported

log = logging.getLogger("mcp_fhir.ehr.hl7")

MAX_MESSAGE_BYTES = 1024 * 1024  # a larger file is skipped, not parsed
MAX_FILES = 10_000
HL7_RESOURCE_TYPES = frozenset({"Observation", "DiagnosticReport"})


@dataclass(frozen=True, slots=True)
class _Parsed:
    mtime_ns: int
    identifiers: frozenset[str]
    observations: tuple[dict[str, Any], ...]
    reports: tuple[dict[str, Any], ...] = ()


class Hl7ResultsSource:
    """ORU^R01 messages in one folder, by patient identifier."""

    def __init__(self, folder: Path, *, timezone: str | None = None) -> None:
        self.folder = folder
        self.timezone = timezone
        self._cache: dict[Path, _Parsed] = {}

    def _scan(self) -> list[_Parsed]:
        parsed: list[_Parsed] = []
        files = sorted(self.folder.glob("*.hl7"))[:MAX_FILES]
        for path in files:
            try:
                stat = path.stat()
            except OSError:
                continue
            cached = self._cache.get(path)
            if cached is None or cached.mtime_ns != stat.st_mtime_ns:
                if stat.st_size > MAX_MESSAGE_BYTES:
                    log.warning("skipped an HL7 v2 file over the size limit")
                    continue
                try:
                    message = parse_oru_r01_message(path.read_bytes(), default_timezone=self.timezone)
                except MCPFhirError as exc:
                    log.warning("skipped an HL7 v2 file that did not parse", extra={"code": exc.code})
                    continue
                ids = frozenset(str(i.get("value")) for i in message.patient_identifiers if i.get("value"))
                cached = self._cache[path] = _Parsed(
                    stat.st_mtime_ns, ids, tuple(message.observations), tuple(message.reports)
                )
            parsed.append(cached)
        return parsed

    def observations_for(self, backend_patient: str) -> list[dict[str, Any]]:
        """Every Observation from messages about this patient, pointed at `Patient/<backend_patient>`."""
        return self.resources_for(backend_patient, "Observation")

    def resources_for(self, backend_patient: str, resource_type: str) -> list[dict[str, Any]]:
        """Every resource of `resource_type` from messages about this patient, pointed at the patient.

        The same message in two files counts once (a resource's id is its message's MSH-10 and position).
        """
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        subject = {"reference": f"Patient/{backend_patient}"}
        for message in self._scan():
            if backend_patient not in message.identifiers:
                continue
            held = message.observations if resource_type == "Observation" else message.reports
            for resource in held if resource_type in HL7_RESOURCE_TYPES else ():
                if resource.get("id") not in seen:
                    seen.add(str(resource.get("id")))
                    out.append({**resource, "subject": dict(subject)})
        return out

    def search(self, resource_type: str, params: Mapping[str, str | Sequence[str]]) -> list[dict[str, Any]]:
        """The patient's resources that meet every filter of `params`, in a stable order (newest first).

        `params` is the query the EHR got (``patient`` is the patient's id on this backend). A filter this
        source cannot apply means no results from it for this search, rather than results that ignore it.
        """
        raw = params.get("patient")
        patient = raw if isinstance(raw, str) else None
        if resource_type not in HL7_RESOURCE_TYPES or not patient:
            return []
        patient = patient.removeprefix("Patient/")
        if bad := unsupported(resource_type, params):
            log.warning(
                "HL7 v2 results left out: a search parameter has no local meaning", extra={"params": bad}
            )
            return []
        return ordered([r for r in self.resources_for(patient, resource_type) if matches(r, params)], params)
