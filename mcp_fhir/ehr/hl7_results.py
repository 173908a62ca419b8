"""The HL7 v2 fallback for results: a drop folder of ORU^R01 messages, served as FHIR Observations.

Australian GP systems often export pathology as HL7 v2 files rather than FHIR. A backend that sets
`hl7v2_results_dir` gets its Observation searches completed from that folder: each message is parsed
once (re-parsed when the file changes), and a message belongs to a patient when one of its PID
identifiers equals the patient's id on that backend. Policy and obligations apply to these
Observations exactly as to any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp_fhir._exceptions import MCPFhirError
from mcp_fhir.ehr.hl7v2 import parse_oru_r01_message

log = logging.getLogger("mcp_fhir.ehr.hl7")

MAX_MESSAGE_BYTES = 1024 * 1024  # a larger file is skipped, not parsed
MAX_FILES = 10_000


@dataclass(frozen=True, slots=True)
class _Parsed:
    mtime_ns: int
    identifiers: frozenset[str]
    observations: tuple[dict[str, Any], ...]


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
                cached = self._cache[path] = _Parsed(stat.st_mtime_ns, ids, tuple(message.observations))
            parsed.append(cached)
        return parsed

    def observations_for(self, backend_patient: str) -> list[dict[str, Any]]:
        """Every Observation from messages about this patient, pointed at `Patient/<backend_patient>`."""
        out = []
        for message in self._scan():
            if backend_patient in message.identifiers:
                out += [
                    {**obs, "subject": {"reference": f"Patient/{backend_patient}"}}
                    for obs in message.observations
                ]
        return out
