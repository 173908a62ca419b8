package mcp_fhir.authz.purpose_test

import data.mcp_fhir.authz.purpose
import data.mcp_fhir.authz.testing

_codes(i) := {r.code | some r in purpose.deny with input as i}

test_treatment_effective_from_declaration if {
	purpose.effective == "treatment" with input as testing.clinician_obs
}

test_bound_purpose_used_when_none_declared if {
	i := testing.patched(testing.clinician_obs, {"/context/purpose": null, "/subject/claims/purpose_of_use": "audit"})
	purpose.effective == "audit" with input as i
}

test_non_string_bound_purpose_denied_mismatch if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/purpose_of_use": 5})
	_codes(i) == {"PURPOSE_MISMATCH"}
}

test_declared_purpose_never_widens_bound_purpose if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/purpose_of_use": "medication_reconciliation"})
	_codes(i) == {"PURPOSE_MISMATCH"}
	not purpose.effective with input as i
}

test_missing_purpose_denied if {
	_codes(testing.patched(testing.clinician_obs, {"/context/purpose": null})) == {"PURPOSE_REQUIRED"}
}

test_medication_reconciliation_labs_denied if {
	_codes(testing.patched(testing.clinician_obs, {"/context/purpose": "medication_reconciliation"})) == {"PURPOSE_NOT_PERMITTED"}
}

test_purpose_max_results_lowers_default if {
	purpose.max_results == 20 with input as testing.clinician_obs
		with data.mcp_fhir.config.purposes.treatment.max_results as 20
}

test_discharge_summary_lookback_is_thirty_days if {
	i := testing.patched(testing.clinician_obs, {"/context/purpose": "discharge_summary"})
	purpose.max_lookback_days == 30 with input as i
}

test_unknown_purpose_has_closed_defaults if {
	i := testing.patched(testing.clinician_obs, {"/context/purpose": "marketing"})
	purpose.max_results == 0 with input as i
	purpose.max_lookback_days == 36500 with input as i
	purpose.redact == set() with input as i
	not purpose.permitted with input as i
}
