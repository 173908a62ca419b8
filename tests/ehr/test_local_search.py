"""FHIR search semantics applied to resources the sidecar holds: date prefixes, tokens, unknown parameters."""

from __future__ import annotations

from typing import Any

import pytest

from mcp_fhir.ehr.local_search import matches, ordered, unsupported


def _obs(effective: Any = "2014-05-27T09:56:00+10:00", **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Observation", "id": "o", **extra}
    if isinstance(effective, dict):
        resource["effectivePeriod"] = effective
    elif effective is not None:
        resource["effectiveDateTime"] = effective
    return resource


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        ("2014", True),
        ("2014-05", True),
        ("2014-05-27", True),
        ("eq2014-05-26", False),
        ("ne2014-05-27", False),
        ("ne2014-05-26", True),
        ("ge2014-05-27", True),
        ("gt2014-05-27", False),
        ("le2014-05-27", True),
        ("lt2014-05-27", False),
        ("lt2014-05-28", True),
        ("sa2014-05-26", True),
        ("eb2014-05-28", True),
        ("eb2014-05-27", False),
        ("ap2014-05", True),
        ("ge2014-05-26T23:00:00Z", True),
        ("ge2014-05-27T00:00:00Z", False),
        ("2014-05-25,2014-05-27", True),
    ],
)
def test_date_prefixes_follow_the_fhir_ranges(date: str, expected: bool) -> None:
    assert matches(_obs(), {"date": date}) is expected


def test_every_value_of_a_repeated_date_parameter_applies() -> None:
    assert matches(_obs(), {"date": ["ge2014-05-01", "le2014-05-31"]})
    assert not matches(_obs(), {"date": ["ge2014-05-01", "le2014-05-26"]})


def test_an_open_period_and_a_missing_date() -> None:
    assert matches(_obs({"start": "2014-05-01"}), {"date": "ge2020-01-01"})
    assert not matches(_obs({"start": "2014-05-01"}), {"date": "lt2014-05-01"})
    assert not matches(_obs(None), {"date": "ge1900"})
    assert matches(_obs(None), {})


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("ORG", True),
        ("urn:x|ORG", True),
        ("urn:y|ORG", False),
        ("urn:x|", True),
        ("|ORG", False),
        ("|LOCAL", True),
        ("NOPE,ORG", True),
    ],
)
def test_tokens_match_code_system_and_both(token: str, expected: bool) -> None:
    code = {"coding": [{"system": "urn:x", "code": "ORG"}, {"code": "LOCAL"}]}
    assert matches(_obs(code=code), {"code": token}) is expected


def test_a_parameter_without_a_local_meaning_is_named() -> None:
    assert unsupported("Observation", {"patient": "p", "date": "ge2014", "code": "x", "_count": "5"}) == []
    assert unsupported("Observation", {"patient": "p", "status": "final"}) == ["status"]
    assert unsupported("Observation", {"patient": "p", "date": "ge-not-a-date"}) == ["date"]
    assert unsupported("Observation", {"_sort": "code"}) == ["_sort"]
    assert unsupported("Condition", {"patient": "p"}) == ["patient"]


def test_results_are_newest_first_or_oldest_first_with_undated_last() -> None:
    a, b, c = _obs("2014-01-01", id="a"), _obs("2015-01-01", id="b"), _obs(None, id="c")
    assert [r["id"] for r in ordered([a, b, c], {})] == ["b", "a", "c"]
    assert [r["id"] for r in ordered([a, b, c], {"_sort": "date"})] == ["a", "b", "c"]
