package mcp_fhir.authz.sensitivity_test

import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.authz.testing

_bg(i, reason) := testing.patched(i, {"/context/break_glass": {"reason": reason}})

test_sensitive_and_restricted_labels_excluded_by_default if {
	ex := sensitivity.excluded with input as testing.clinician_obs
	{"PSY", "HIV", "ETH", "SDV", "STD", "R", "V"} - ex == set()
}

test_role_purpose_pair_releases_labels if {
	ex := sensitivity.excluded with input as testing.clinician_obs
		with data.mcp_fhir.config.roles.clinician.sensitive_labels as {"treatment": ["HIV", "NOT_A_LABEL"]}
	not "HIV" in ex
	"PSY" in ex
}

test_clinician_break_glass_excludes_nothing if {
	sensitivity.excluded == set() with input as _bg(testing.clinician_obs, "arrest")
}

test_break_glass_still_excluded_labels_are_kept if {
	sensitivity.excluded == {"PSYTHPN"} with input as _bg(testing.clinician_obs, "arrest")
		with data.mcp_fhir.config.labels.break_glass_excluded as ["PSYTHPN"]
}

test_nurse_break_glass_denied if {
	i := testing.req(["nurse"], ["user/*.rs"], "search_observations", "search", "Observation", "p1", "treatment")
	{r.code | some r in sensitivity.deny with input as _bg(i, "arrest")} == {"BREAK_GLASS_NOT_PERMITTED"}
}

test_break_glass_without_reason_denied if {
	i := testing.patched(testing.clinician_obs, {"/context/break_glass": {}})
	{r.code | some r in sensitivity.deny with input as i} == {"BREAK_GLASS_REASON_REQUIRED"}
	not sensitivity.break_glass_invoked with input as i
}

test_clinician_release_is_not_a_non_clinician_release if {
	not sensitivity.non_clinician_release with input as _bg(testing.clinician_obs, "arrest")
}

# ok (what allow asks) is exactly "no sensitivity deny reason", on every input of testing.ok_inputs.
test_ok_is_no_deny_reason if {
	mismatches := {i |
		some i in testing.ok_inputs
		data.mcp_fhir.authz.sensitivity.ok with input as i
		count(data.mcp_fhir.authz.sensitivity.deny) > 0 with input as i
	} | {i |
		some i in testing.ok_inputs
		count(data.mcp_fhir.authz.sensitivity.deny) == 0 with input as i
		not data.mcp_fhir.authz.sensitivity.ok with input as i
	}
	count(mismatches) == 0
}

test_ok_fails_on_some_input if {
	some i in testing.ok_inputs
	not data.mcp_fhir.authz.sensitivity.ok with input as i
}

# The derived label_set (read as a set with object.keys) holds exactly the derived labels, and
# all_labels is the same with and without the derived tables.
test_label_set_is_the_labels if {
	object.keys(data.mcp_fhir.derived.label_set) == {l | some l in data.mcp_fhir.derived.labels}
	fast := sensitivity.all_labels
	slow := sensitivity.all_labels with data.mcp_fhir.derived as {}
	fast == slow
}
