"""Least-privilege scope computation (mcp_fhir/ehr/scopes.py)."""

from __future__ import annotations

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.ehr.scopes import required_scopes, scope_covers, unavailable_tools

# The sidecar's own catalogue: scopes are computed from exactly what the server registers.


def test_only_search_observations_requests_exactly_observation_rs_in_v2() -> None:
    assert required_scopes(["search_observations"], syntax="v2", catalogue=CATALOGUE) == [
        "system/Observation.rs"
    ]


def test_only_search_observations_requests_exactly_observation_read_in_v1() -> None:
    assert required_scopes(["search_observations"], syntax="v1", catalogue=CATALOGUE) == [
        "system/Observation.read"
    ]


def test_read_and_search_of_one_type_merge_into_one_v2_scope_in_crud_order() -> None:
    scopes = required_scopes(
        ["read_document", "list_documents", "create_clinical_note"], syntax="v2", catalogue=CATALOGUE
    )
    assert scopes == ["system/DocumentReference.crs"]


def test_create_needs_write_and_read_needs_read_in_v1() -> None:
    scopes = required_scopes(["read_document", "create_clinical_note"], syntax="v1", catalogue=CATALOGUE)
    assert scopes == ["system/DocumentReference.read", "system/DocumentReference.write"]


def test_create_alone_requests_only_create_in_v2() -> None:
    assert required_scopes(["create_clinical_note"], syntax="v2", catalogue=CATALOGUE) == [
        "system/DocumentReference.c"
    ]


def test_audit_events_are_never_requested_from_the_ehr() -> None:
    assert required_scopes(["search_audit_log"], syntax="v2", catalogue=CATALOGUE) == []
    assert not any("AuditEvent" in s for s in required_scopes(CATALOGUE, syntax="v1", catalogue=CATALOGUE))


def test_all_tools_in_v2_request_one_scope_per_patient_type() -> None:
    scopes = required_scopes(CATALOGUE, syntax="v2", catalogue=CATALOGUE)
    assert scopes == sorted(
        [
            "system/AllergyIntolerance.rs",
            "system/Condition.rs",
            "system/DocumentReference.crs",
            "system/Encounter.rs",
            "system/Immunization.rs",
            "system/MedicationRequest.rs",
            "system/MedicationStatement.rs",
            "system/Observation.rs",
            "system/Patient.rs",
            "system/Procedure.rs",
        ]
    )


def test_an_unknown_tool_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        required_scopes(["drop_database"], syntax="v2", catalogue=CATALOGUE)
    assert info.value.code == "config_invalid"
    assert info.value.key == "tools.enabled"


def test_an_unknown_syntax_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        required_scopes(["read_patient"], syntax="v3", catalogue=CATALOGUE)  # type: ignore[arg-type]
    assert info.value.key == "smart.scope_syntax"


def test_v2_rs_covers_both_read_and_search() -> None:
    assert scope_covers(["system/Observation.rs"], "Observation", "r")
    assert scope_covers(["system/Observation.rs"], "Observation", "s")
    assert not scope_covers(["system/Observation.rs"], "Observation", "c")


def test_v1_read_covers_read_and_search_but_not_create() -> None:
    assert scope_covers(["system/Observation.read"], "Observation", "s")
    assert not scope_covers(["system/Observation.read"], "Observation", "c")
    assert scope_covers(["system/Observation.write"], "Observation", "c")


def test_wildcards_cover_any_type_and_any_permission() -> None:
    assert scope_covers(["system/*.rs"], "Condition", "s")
    assert scope_covers(["system/*.*"], "DocumentReference", "c")
    assert scope_covers(["system/Patient.*"], "Patient", "d")


def test_patient_and_user_context_scopes_do_not_count_for_a_backend() -> None:
    assert not scope_covers(["patient/Observation.rs", "user/*.read"], "Observation", "s")


def test_a_query_restricted_scope_does_not_cover_the_whole_type() -> None:
    assert not scope_covers(["system/Observation.rs?category=laboratory"], "Observation", "s")


def test_tools_whose_scopes_were_not_granted_are_listed_with_what_they_miss() -> None:
    enabled = ["search_observations", "read_patient", "patient_summary", "create_clinical_note"]
    granted = ["system/Observation.rs", "system/Condition.s", "system/Condition.r?category=problem-list-item"]
    missing = unavailable_tools(enabled, granted, "v2", CATALOGUE)
    assert missing == {
        "read_patient": ["system/Patient.r"],
        "patient_summary": [
            "system/AllergyIntolerance.r",
            "system/Condition.r",
            "system/MedicationStatement.r",
            "system/Patient.r",
        ],
        "create_clinical_note": ["system/DocumentReference.c"],
    }


def test_a_full_v1_grant_leaves_no_tool_unavailable() -> None:
    granted = required_scopes(CATALOGUE, syntax="v1", catalogue=CATALOGUE)
    assert unavailable_tools(CATALOGUE, granted, "v1", CATALOGUE) == {}


def test_missing_scopes_are_reported_in_v1_syntax_when_asked() -> None:
    missing = unavailable_tools(["create_clinical_note"], ["system/DocumentReference.read"], "v1", CATALOGUE)
    assert missing == {"create_clinical_note": ["system/DocumentReference.write"]}


def test_a_search_tool_granted_only_read_misses_search() -> None:
    missing = unavailable_tools(["search_conditions"], ["system/Condition.r"], "v2", CATALOGUE)
    assert missing == {"search_conditions": ["system/Condition.s"]}
