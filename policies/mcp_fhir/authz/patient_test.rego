package mcp_fhir.authz.patient_test

import data.mcp_fhir.authz.patient
import data.mcp_fhir.authz.testing

_codes(i) := {r.code | some r in patient.deny with input as i}

test_canonical_strips_patient_prefix if {
	patient.canonical("Patient/123") == "123"
	patient.canonical("123") == "123"
}

test_bound_subject_reads_own_patient_allowed if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/patient": "Patient/p1"})
	_codes(i) == set()
}

test_bound_subject_reads_other_patient_denied if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/patient": "p9"})
	_codes(i) == {"PATIENT_MISMATCH"}
}

test_bound_subject_with_unreadable_claim_denied if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/patient": {"id": "p1"}})
	_codes(i) == {"PATIENT_MISMATCH"}
}

test_bound_subject_patientless_search_denied if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/patient": "p1", "/resource/patient": null})
	_codes(i) == {"PATIENT_REQUIRED"}
}

test_audit_event_is_not_patient_data if {
	i := testing.req(["auditor"], ["user/*.rs"], "search_audit_log", "search", "AuditEvent", null, "audit")
	not patient.patient_data with input as i
	_codes(i) == set()
}

test_admin_patient_filter_denied if {
	i := testing.req(["admin"], ["user/*.rs"], "search_audit_log", "search", "AuditEvent", "p1", "audit")
	_codes(i) == {"PATIENT_FILTER_NOT_PERMITTED"}
}
