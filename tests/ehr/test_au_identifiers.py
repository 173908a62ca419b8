"""AU identifier checks. Known-valid numbers: AU samples (SOURCES.md §5) and the algorithms file."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_fhir.ehr.au_identifiers import (
    is_valid_dva,
    is_valid_hpii,
    is_valid_hpio,
    is_valid_ihi,
    is_valid_medicare,
    luhn_ok,
)

# hl7au/au-fhir-test-data Patient-bassett-imogene-betsy.json, and AU Base patient-example0.xml / au-ihi.xml
VALID_IHIS = ["8003608000311696", "8003608833357361"]
# AU Base IG examples (HPI-I in practitioner examples, HPI-O in organization examples)
VALID_HPIIS = ["8003619900015717"]
VALID_HPIOS = ["8003621566684455"]
# au-fhir-test-data (11 digits with IRN), AU Base example0, and the NEHTA worked example '2123 45670 1'
VALID_MEDICARE = ["69518257911", "32788511952", "2123456701"]


def _corruptions(number: str, positions: range) -> list[str]:
    return [number[:i] + d + number[i + 1 :] for i in positions for d in "0123456789" if d != number[i]]


@pytest.mark.parametrize(
    ("check", "numbers"),
    [(is_valid_ihi, VALID_IHIS), (is_valid_hpii, VALID_HPIIS), (is_valid_hpio, VALID_HPIOS)],
)
def test_known_healthcare_identifiers_pass_and_every_single_digit_corruption_fails(
    check: Callable[[str], bool], numbers: list[str]
) -> None:
    for number in numbers:
        assert check(number)
        assert check(f"{number[:4]} {number[4:8]} {number[8:12]} {number[12:]}")  # printed form
        for corrupted in _corruptions(number, range(16)):
            assert not check(corrupted), corrupted


def test_hi_prefixes_are_not_interchangeable() -> None:
    assert not is_valid_hpii(VALID_IHIS[0])
    assert not is_valid_ihi(VALID_HPIOS[0])
    assert not is_valid_hpio(VALID_HPIIS[0])


def test_known_medicare_numbers_pass_and_corrupting_any_checked_digit_fails() -> None:
    # The check digit covers digits 1-8 and itself (position 9); the issue number and IRN carry no check,
    # so their corruption cannot be detected (except an IRN of 0).
    for number in VALID_MEDICARE:
        assert is_valid_medicare(number)
        for corrupted in _corruptions(number, range(9)):
            assert not is_valid_medicare(corrupted), corrupted


def test_medicare_number_failing_its_check_digit_is_rejected() -> None:
    # au-fhir-test-data Patient-bennelong-anne.json, listed in the algorithms file as failing the check.
    assert not is_valid_medicare("6951449677")


@pytest.mark.parametrize("value", ["", "123", "1123456701", "7123456701", "21234567010", "212345670A", None])
def test_malformed_medicare_numbers_are_rejected(value: str) -> None:
    assert not is_valid_medicare(value)


@pytest.mark.parametrize("value", ["QX144963", "WA123456B", "n123"])
def test_dva_numbers_in_the_published_shape_pass(value: str) -> None:
    assert is_valid_dva(value)


@pytest.mark.parametrize("value", ["", "144963", "QX", "ABCD12345", "QX1234567890", "Q/X1"])
def test_dva_numbers_in_another_shape_fail(value: str) -> None:
    assert not is_valid_dva(value)


def test_luhn_rejects_non_digits_and_short_input() -> None:
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
    assert not luhn_ok("7")
    assert not luhn_ok("٧٩٩٢٧٣٩٨٧١٣")  # non-ASCII digits


@given(st.text(alphabet="0123456789", min_size=9, max_size=9), st.integers(min_value=1, max_value=9))
def test_random_ihi_with_a_wrong_luhn_digit_is_rejected(body: str, delta: int) -> None:
    stem = "800360" + body
    good = next(d for d in "0123456789" if luhn_ok(stem + d))
    wrong = str((int(good) + delta) % 10)
    assert is_valid_ihi(stem + good)
    assert not is_valid_ihi(stem + wrong)


@given(st.text(alphabet="0123456789", min_size=16, max_size=16))
def test_random_16_digit_strings_pass_only_with_prefix_and_luhn(number: str) -> None:
    assert is_valid_ihi(number) == (number.startswith("800360") and luhn_ok(number))
