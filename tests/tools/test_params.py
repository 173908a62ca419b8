"""Tool parameter rules: bounded date ranges and the PHI-free audit view of arguments."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from pydantic import TypeAdapter, ValidationError

from mcp_fhir._exceptions import InvalidArgument
from mcp_fhir.tools.params import FHIR_ID, Category, Code, audit_params, check_range

MAX_DAYS = 3660


@pytest.mark.parametrize(
    ("date_from", "date_to", "argument"),
    [
        (date(2024, 2, 1), date(2024, 1, 1), "date_from"),
        (date(1026, 1, 1), date(2026, 1, 1), "date_to"),
        (date.today() - timedelta(days=MAX_DAYS * 3 + 1), None, "date_from"),
    ],
)
def test_a_bad_date_range_is_refused_naming_the_argument(date_from, date_to, argument):
    with pytest.raises(InvalidArgument) as caught:
        check_range(date_from, date_to, max_days=MAX_DAYS)
    assert (caught.value.code, caught.value.argument) == ("invalid_argument", argument)


def test_an_ordered_bounded_range_is_accepted():
    check_range(date(2024, 1, 1), date(2024, 12, 31), max_days=MAX_DAYS)
    check_range(None, None, max_days=MAX_DAYS)


@pytest.mark.parametrize("value", ["../Patient/x", "pat-au-001/../../x", "a b", "", "x" * 65, "pat?x=1"])
def test_a_hostile_id_does_not_match_the_fhir_id_grammar(value):
    assert re.fullmatch(FHIR_ID, value) is None


@pytest.mark.parametrize("value", ["x&patient=other", "laboratory,_include=*", "a b", "lab#frag"])
def test_search_injection_is_not_a_valid_category_or_code(value):
    for annotated in (Category, Code):
        with pytest.raises(ValidationError):
            TypeAdapter(annotated).validate_python(value)


def test_a_system_and_code_token_is_accepted():
    assert TypeAdapter(Code).validate_python("http://loinc.org|4548-4") == "http://loinc.org|4548-4"


def test_audit_params_drop_unset_values_and_render_dates():
    assert audit_params(code="4548-4", date_from=date(2024, 1, 2), page_size=None) == {
        "code": "4548-4",
        "date_from": "2024-01-02",
    }
