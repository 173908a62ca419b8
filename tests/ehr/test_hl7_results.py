"""The HL7 v2 results folder: each file parsed once and again when it changes, per-patient, bounded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mcp_fhir.ehr import hl7_results
from mcp_fhir.ehr.hl7_results import MAX_MESSAGE_BYTES, Hl7ResultsSource
from tests.data import VENDOR_SAMPLES

VENDOR = VENDOR_SAMPLES
# Sources (vendor-samples/SOURCES.md): the HL7 normative glucose example via python-hl7 (patient 555-44-4444),
# and the NIST ELR 2.5.1 lead test case via node-hl7-complete (patient 9817566735).
GLUCOSE = VENDOR / "oru_r01_hl7_spec_glucose_python-hl7.hl7"
LEAD = VENDOR / "oru_r01_nist_elr_2.5.1_lead.hl7"


class CountingParser:
    def __init__(self) -> None:
        self.calls = 0
        self.real = hl7_results.parse_oru_r01_message

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def parser(monkeypatch: pytest.MonkeyPatch) -> CountingParser:
    counting = CountingParser()
    monkeypatch.setattr(hl7_results, "parse_oru_r01_message", counting)
    return counting


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(GLUCOSE, tmp_path / "glucose.hl7")
    shutil.copy(LEAD, tmp_path / "lead.hl7")
    return tmp_path


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_patients_observations_come_only_from_their_own_messages(folder: Path):
    source = Hl7ResultsSource(folder)
    glucose = source.observations_for("555-44-4444")
    lead = source.observations_for("9817566735")
    assert len(glucose) == 2 and len(lead) == 1
    assert {o["subject"]["reference"] for o in glucose} == {"Patient/555-44-4444"}
    assert {o["id"] for o in glucose}.isdisjoint({o["id"] for o in lead})
    assert source.observations_for("someone-else") == []


def test_a_file_is_parsed_once_while_it_is_unchanged(folder: Path, parser: CountingParser):
    source = Hl7ResultsSource(folder)
    for _ in range(3):
        source.observations_for("555-44-4444")
    assert parser.calls == 2  # two files, once each


def test_a_changed_file_is_parsed_again_and_its_new_patient_is_served(folder: Path, parser: CountingParser):
    source = Hl7ResultsSource(folder)
    assert len(source.observations_for("555-44-4444")) == 2
    target = folder / "glucose.hl7"
    target.write_bytes(LEAD.read_bytes())  # the file now holds another patient's message
    _bump_mtime(target)
    assert source.observations_for("555-44-4444") == []
    assert len(source.observations_for("9817566735")) == 1  # the same message in two files counts once
    assert parser.calls == 3


def test_an_oversize_file_is_skipped_without_parsing(folder: Path, parser: CountingParser):
    big = folder / "big.hl7"
    big.write_bytes(GLUCOSE.read_bytes() + b"\r" + b"NTE|1||" + b"x" * MAX_MESSAGE_BYTES + b"\r")
    source = Hl7ResultsSource(folder)
    assert len(source.observations_for("555-44-4444")) == 2
    assert parser.calls == 2


def test_an_unparsable_file_is_skipped_and_the_rest_still_served(folder: Path):
    (folder / "junk.hl7").write_bytes(b"this is not HL7 at all\r\x00\xff")
    (folder / "empty.hl7").write_bytes(b"")
    source = Hl7ResultsSource(folder)
    assert len(source.observations_for("555-44-4444")) == 2


def test_a_file_that_turns_unparsable_stops_being_served(folder: Path):
    source = Hl7ResultsSource(folder)
    assert len(source.observations_for("9817566735")) == 1
    target = folder / "lead.hl7"
    target.write_bytes(b"garbage")
    _bump_mtime(target)
    assert source.observations_for("9817566735") == []


def test_files_without_the_hl7_suffix_are_ignored(tmp_path: Path):
    shutil.copy(GLUCOSE, tmp_path / "glucose.txt")
    assert Hl7ResultsSource(tmp_path).observations_for("555-44-4444") == []
