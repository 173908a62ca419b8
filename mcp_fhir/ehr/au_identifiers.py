"""Check-digit and format validation for Australian healthcare identifiers.

Sources (see ``tests/data/vendor-samples/au_identifier_check_algorithms.md``):

* IHI / HPI-I / HPI-O: 16 digits, prefix ``800360`` / ``800361`` / ``800362``, last digit is an
  ISO/IEC 7812 Luhn check digit over the first 15 (AU Base invariants ``inv-ihi-value-0..2``).
* Medicare card number: 10 digits (8 digits, check digit, issue number) or 11 (plus the IRN, 1-9).
  First digit 2-6; check digit (position 9) = sum(d_i * w_i) mod 10 with weights 1,3,7,9,1,3,7,9
  (NEHTA SCR v1.4 text). AU Base itself defines no Medicare check-digit invariant.
* DVA file number: no check digit and no official format rule was found. We accept the shape seen in
  published examples (``QX144963``, ``WA123456B``): 1-3 letters (state code and optional war code),
  then 1-7 digits, then an optional single segment letter; total length at most 9. Format only.

All functions are pure, accept surrounding whitespace and the usual spaces/hyphens in printed numbers,
and never raise on bad input: they answer ``False``.
"""

from __future__ import annotations

import re

__all__ = [
    "HPII_PREFIX",
    "HPIO_PREFIX",
    "IHI_PREFIX",
    "is_valid_dva",
    "is_valid_hpii",
    "is_valid_hpio",
    "is_valid_ihi",
    "is_valid_medicare",
    "luhn_ok",
    "normalise_number",
]

IHI_PREFIX = "800360"
HPII_PREFIX = "800361"
HPIO_PREFIX = "800362"
HI_LENGTH = 16
MAX_INPUT_LENGTH = 64

_MEDICARE_WEIGHTS = (1, 3, 7, 9, 1, 3, 7, 9)
_DVA_RE = re.compile(r"^[A-Z]{1,3}[0-9]{1,7}[A-Z]?$")
_SEPARATORS = re.compile(r"[\s\-]")


def normalise_number(value: str) -> str:
    """Strip whitespace and hyphens that people type into printed numbers."""
    if not isinstance(value, str) or len(value) > MAX_INPUT_LENGTH:
        return ""
    return _SEPARATORS.sub("", value)


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (ASCII digits only, any length ≥ 2) passes the ISO/IEC 7812 Luhn check."""
    if not isinstance(digits, str) or len(digits) < 2 or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _is_hi(value: str, prefix: str) -> bool:
    number = normalise_number(value)
    return (
        len(number) == HI_LENGTH
        and number.isascii()
        and number.isdigit()
        and number.startswith(prefix)
        and luhn_ok(number)
    )


def is_valid_ihi(value: str) -> bool:
    """Individual Healthcare Identifier: 16 digits, prefix 800360, Luhn."""
    return _is_hi(value, IHI_PREFIX)


def is_valid_hpii(value: str) -> bool:
    """Healthcare Provider Identifier - Individual: 16 digits, prefix 800361, Luhn."""
    return _is_hi(value, HPII_PREFIX)


def is_valid_hpio(value: str) -> bool:
    """Healthcare Provider Identifier - Organisation: 16 digits, prefix 800362, Luhn."""
    return _is_hi(value, HPIO_PREFIX)


def is_valid_medicare(value: str) -> bool:
    """Medicare card number, 10 digits or 11 with the IRN; first digit 2-6; weighted check digit at 9."""
    number = normalise_number(value)
    if len(number) not in (10, 11) or not number.isascii() or not number.isdigit():
        return False
    if number[0] not in "23456":
        return False
    if len(number) == 11 and number[10] == "0":
        return False  # the IRN is the person's position on the card, 1-9
    checksum = sum(int(d) * w for d, w in zip(number[:8], _MEDICARE_WEIGHTS, strict=True)) % 10
    return checksum == int(number[8])


def is_valid_dva(value: str) -> bool:
    """DVA file number, format only (no check digit exists); see the module docstring for the rule."""
    number = normalise_number(value).upper()
    return len(number) <= 9 and bool(_DVA_RE.match(number))
