"""Profile registry, version detection and query checks (mcp_fhir/ehr/profiles/__init__.py, base.py)."""

from __future__ import annotations

import json

import pytest

from mcp_fhir._exceptions import ConfigError, InvalidArgument, UpstreamBadResponse
from mcp_fhir.ehr.profiles import PROFILES, detect_fhir_version, get_profile, profile_for_version
from tests.data import VENDOR_SAMPLES

SAMPLES = VENDOR_SAMPLES


def test_every_documented_profile_is_registered() -> None:
    assert {"r4", "epic", "cerner", "stu3", "au_gp", "best_practice", "medical_director", "genie"} <= set(
        PROFILES
    )


def test_unknown_profile_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        get_profile("meditech")
    assert info.value.code == "config_invalid"


@pytest.mark.parametrize(
    ("version", "expected"), [("4.0.1", "4.0.1"), ("4.0.0", "4.0.1"), ("3.0.2", "3.0.2")]
)
def test_fhir_version_is_read_from_the_capability_statement(version: str, expected: str) -> None:
    assert detect_fhir_version({"resourceType": "CapabilityStatement", "fhirVersion": version}) == expected


@pytest.mark.parametrize(
    "statement",
    [
        {"resourceType": "CapabilityStatement"},
        {"resourceType": "CapabilityStatement", "fhirVersion": "1.0.2"},
        {"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"},
        {"resourceType": "Patient", "fhirVersion": "4.0.1"},
        {"resourceType": "CapabilityStatement", "fhirVersion": 4},
    ],
)
def test_missing_or_unknown_fhir_version_is_a_bad_upstream_response(statement: dict) -> None:
    with pytest.raises(UpstreamBadResponse) as info:
        detect_fhir_version(statement)
    assert info.value.code == "upstream_bad_response"


def test_detected_version_selects_the_generic_profile() -> None:
    assert profile_for_version("4.0.1").name == "r4"
    assert profile_for_version("3.0.2").name == "stu3"
    with pytest.raises(ConfigError):
        profile_for_version("5.0.0")


def test_cerner_search_without_patient_is_rejected_before_it_is_sent() -> None:
    cerner = get_profile("cerner")
    with pytest.raises(InvalidArgument) as info:
        cerner.check_query("Observation", {"category": "laboratory"})
    assert info.value.code == "invalid_argument"
    assert info.value.argument == "patient"


def test_cerner_search_with_patient_or_subject_or_id_is_accepted() -> None:
    cerner = get_profile("cerner")
    cerner.check_query("Observation", {"patient": "12724066", "category": "laboratory"})
    cerner.check_query("Condition", {"subject": "Patient/12724066"})
    cerner.check_query("Observation", {"_id": "L-206310347"})
    cerner.check_query("Patient", {"family": "SMART"})


def test_cerner_search_with_an_empty_patient_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        get_profile("cerner").check_query("Condition", {"patient": ""})


def test_profiles_that_do_not_require_a_patient_accept_any_search() -> None:
    for name in ("r4", "epic", "stu3", "au_gp"):
        get_profile(name).check_query("Observation", {"code": "2339-0"})


def test_rate_limit_defaults_are_documented_and_overridable() -> None:
    assert get_profile("cerner").default_rate_limit_per_minute == 100
    assert get_profile("epic").default_rate_limit_per_minute == 60
    assert get_profile("r4").default_rate_limit_per_minute is None
    assert get_profile("cerner").with_rate_limit(30).default_rate_limit_per_minute == 30
    with pytest.raises(ConfigError) as info:
        get_profile("cerner").with_rate_limit(0)
    assert info.value.key == "profiles.cerner.rate_limit_per_minute"


def test_only_au_gp_profiles_deliver_hl7v2_results() -> None:
    assert {n for n, p in PROFILES.items() if p.supports_hl7v2_results} == {
        "au_gp",
        "best_practice",
        "medical_director",
        "genie",
    }


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_rejects_input_that_is_not_a_resource(name: str) -> None:
    for bad in ([], "Patient", {"id": "x"}, {"resourceType": ""}):
        with pytest.raises(UpstreamBadResponse):
            PROFILES[name].normalise(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_keeps_last_updated_and_security_labels_and_never_mutates_input(name: str) -> None:
    # HL7 fhir_models @d5a09480 condition-example-f202-malignancy.json (meta.security TBOO)
    original = json.loads((SAMPLES / "r4_condition_meta_security_TBOO.json").read_text())
    original["meta"]["lastUpdated"] = "2024-01-02T03:04:05Z"
    snapshot = json.dumps(original, sort_keys=True)
    result = PROFILES[name].normalise(original)
    assert result.resource["meta"]["lastUpdated"] == "2024-01-02T03:04:05Z"
    assert result.resource["meta"]["security"] == original["meta"]["security"]
    assert result.extras["last_updated"] == "2024-01-02T03:04:05Z"
    assert json.dumps(original, sort_keys=True) == snapshot


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_tolerates_a_bare_resource(name: str) -> None:
    for rtype in ("Patient", "Observation", "Condition", "MedicationStatement", "DocumentReference"):
        result = PROFILES[name].normalise({"resourceType": rtype})
        assert result.resource["resourceType"] == rtype


def test_normalised_repr_shows_no_resource_content() -> None:
    result = get_profile("r4").normalise(
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Secret"}]}
    )
    assert "Secret" not in repr(result)
