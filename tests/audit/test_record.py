"""AuditRecord: deterministic JSON, a redacted repr, and a strict kind/result."""

from __future__ import annotations

import re

import pytest

from mcp_fhir.audit.chain import canonical_json
from mcp_fhir.audit.record import AuditRecord, utc_now_ms

from .conftest import make_record


def test_utc_now_ms_is_rfc3339_to_the_millisecond() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_now_ms())


def test_a_record_round_trips_and_serialises_deterministically() -> None:
    rec = make_record(5)
    again = AuditRecord.from_dict(rec.to_dict())
    assert again == rec
    assert canonical_json(rec.to_dict()) == canonical_json(again.to_dict())


def test_the_repr_shows_no_patient_or_params() -> None:
    text = repr(make_record(5, patient="pat-secret"))
    assert "pat-secret" not in text and "laboratory" not in text


def test_an_unknown_kind_or_result_is_refused() -> None:
    with pytest.raises(ValueError):
        make_record(1, kind="mystery")
    with pytest.raises(ValueError):
        make_record(1, result="maybe")
