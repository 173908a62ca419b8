"""Plain R4 profile: identity. Samples: SOURCES.md §3 and §6 (HL7 R4 examples, DS4P label examples)."""

from __future__ import annotations

import json

import pytest

from mcp_fhir.ehr.profiles import get_profile
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES


@pytest.mark.parametrize(
    "name",
    [
        "r4_patient.json",
        "r4_condition.json",
        "r4_observation_lab_glucose.json",
        "r4_documentreference_securitylabel_V.json",
        "ds4p_observation_meta_security_R_with_basis.json",
    ],
)
def test_r4_profile_is_an_identity_copy(name: str) -> None:
    original = json.loads((SAMPLES / name).read_text())
    result = get_profile("r4").normalise(original)
    assert result.resource == original
    assert result.resource is not original
    assert result.unmapped == []
