package mcp_fhir.authz.scopes_test

import data.mcp_fhir.authz.scopes
import data.mcp_fhir.authz.testing

test_v1_read_scope_parses_to_r_and_s if {
	scopes.parse("patient/Observation.read") == {"context": "patient", "type": "Observation", "letters": {"r", "s"}, "categories": null}
}

test_v1_wildcard_parses_to_all_letters if {
	scopes.parse("*.*").letters == {"c", "r", "u", "d", "s"}
	scopes.parse("user/*.write").letters == {"c", "u", "d"}
}

test_v2_category_scope_parses_categories if {
	s := scopes.parse("patient/Observation.rs?category=http://x|laboratory,vital-signs")
	s.categories == {"laboratory", "vital-signs"}
	s.letters == {"r", "s"}
}

test_unhonourable_scopes_are_ignored if {
	every raw in ["patient/Observation.sr", "Observation.", "patient/Observation.read?category=x", "patient/Observation.rs?code=1", "openid", "launch/patient"] {
		not scopes.parse(raw)
	}
}

test_patient_scope_needs_a_named_patient if {
	parsed := scopes.parsed_scopes(["patient/AuditEvent.s"])
	scopes.covers(parsed, "AuditEvent", "s", true)
	not scopes.covers(parsed, "AuditEvent", "s", false)
}

test_mixed_scopes_unrestricted_wins if {
	parsed := scopes.parsed_scopes(["user/Observation.s?category=laboratory", "user/Observation.s"])
	not scopes.categories(parsed, "Observation", "s", true)
}

test_category_scope_narrows_categories if {
	parsed := scopes.parsed_scopes(["user/Observation.s?category=laboratory", "user/Observation.s?category=x|vital-signs"])
	scopes.categories(parsed, "Observation", "s", true) == {"laboratory", "vital-signs"}
}

_scope_cases := [
	["user/*.cruds"],
	["user/Observation.rs", "user/Patient.rs"],
	["patient/Observation.rs?category=laboratory", "user/Observation.s?category=vital-signs"],
	["user/Observation.s?category=laboratory", "Observation.read"],
	["patient/*.read", "system/Observation.s?category=http://x|laboratory,social-history"],
	["user/Patient.r", "garbage"],
	[],
]

# The request path (_request_covering, request_categories) writes covering() and categories() out
# over the pre-filtered scopes: both must agree with the general functions for every case.
test_request_scopes_agree_with_the_general_functions if {
	mismatches := {[raw, patient] |
		some raw in _scope_cases
		some patient in ["p1", null]
		i := testing.patched(testing.clinician_obs, {"/subject/scopes": raw, "/resource/patient": patient})
		not _agrees(i, scopes.parsed_scopes(raw), patient != null)
	}
	count(mismatches) == 0
}

_agrees(i, parsed, given) if {
	cover := scopes.covering(parsed, "Observation", "s", given)
	scopes._request_covering == cover with input as i
	_same_categories(i, parsed, given)
}

_same_categories(i, parsed, given) if {
	scopes.request_categories == scopes.categories(parsed, "Observation", "s", given) with input as i
} else if {
	not scopes.request_categories with input as i
	not scopes.categories(parsed, "Observation", "s", given)
}

test_scope_not_granted_denied if {
	i := testing.patched(testing.clinician_obs, {"/subject/scopes": ["user/Patient.rs"]})
	{r.code | some r in scopes.deny with input as i} == {"SCOPE_NOT_GRANTED"}
}

test_create_needs_c_letter if {
	i := testing.req(["clinician"], ["user/DocumentReference.rs"], "create_clinical_note", "create", "DocumentReference", "p1", "treatment")
	not scopes.covered with input as i
}
