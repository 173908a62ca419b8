package mcp_fhir.authz.patient_test

import data.mcp_fhir.authz
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

# search_audit_log sends its patient filter as resource.patient. The policy decides who may filter
# (patient_filter), whether a patient-bound subject sees other patients' events
# (audit_log.bound_subject_own_patient_only) and whether events about patients are visible at all
# (roles.<role>.audit_patient_events); allowed decisions carry obligations.audit_patients.
_audit(roles, patient, claims) := testing.patched(
	testing.req(roles, ["user/AuditEvent.rs"], "search_audit_log", "search", "AuditEvent", patient, "audit"),
	{"/subject/claims": object.union({"roles": roles}, claims)},
)

_audit_cases := {
	"auditor, no filter: every patient": {"input": _audit(["auditor"], null, {}), "codes": [], "patients": null},
	"auditor filters by p1": {"input": _audit(["auditor"], "p1", {}), "codes": [], "patients": ["p1"]},
	"auditor filters by Patient/p1: canonical id": {"input": _audit(["auditor"], "Patient/p1", {}), "codes": [], "patients": ["p1"]},
	"admin, no filter: every patient (entity redacted)": {"input": _audit(["admin"], null, {}), "codes": [], "patients": null},
	"admin may not filter by patient": {"input": _audit(["admin"], "p1", {}), "codes": ["PATIENT_FILTER_NOT_PERMITTED"]},
	"bound auditor, no filter: own patient only": {"input": _audit(["auditor"], null, {"patient": "Patient/p1"}), "codes": [], "patients": ["p1"]},
	"bound auditor filters by own patient": {"input": _audit(["auditor"], "p1", {"patient": "p1"}), "codes": [], "patients": ["p1"]},
	"bound auditor filters by another patient": {"input": _audit(["auditor"], "p2", {"patient": "p1"}), "codes": ["PATIENT_MISMATCH"]},
	"bound admin, no filter: own patient only": {"input": _audit(["admin"], null, {"patient": "p1"}), "codes": [], "patients": ["p1"]},
	"bound subject with an unreadable claim: no patient's events": {"input": _audit(["auditor"], null, {"patient": 7}), "codes": [], "patients": []},
}

test_audit_log_patient_decisions[note] if {
	some note, case in _audit_cases
	d := authz.decision with input as case.input
	sort({r.code | some r in d.reasons}) == case.codes
	_audit_patients_agree(d, case)
}

_audit_patients_agree(d, case) if {
	d.allow
	d.obligations.audit_patients == case.patients
}

_audit_patients_agree(d, case) if {
	not d.allow
	not "audit_patients" in object.keys(d.obligations)
	not "patients" in object.keys(case)
}

# Data decides: with the binding waived, a bound subject sees and may filter for other patients;
# a role without audit_patient_events gets only events about no patient.
_waived_cases := {
	"waived, bound auditor, no filter: every patient": {"input": _audit(["auditor"], null, {"patient": "p1"}), "codes": [], "patients": null},
	"waived, bound auditor filters by another patient": {"input": _audit(["auditor"], "p2", {"patient": "p1"}), "codes": [], "patients": ["p2"]},
}

test_audit_log_binding_waived_by_data[note] if {
	some note, case in _waived_cases
	d := authz.decision with input as case.input
		with data.mcp_fhir.config.audit_log.bound_subject_own_patient_only as false
	sort({r.code | some r in d.reasons}) == case.codes
	_audit_patients_agree(d, case)
}

test_audit_log_without_patient_events_returns_no_patient if {
	d := authz.decision with input as _audit(["auditor"], "p1", {})
		with data.mcp_fhir.config.roles.auditor.audit_patient_events as false
	d.allow
	d.obligations.audit_patients == []
}

test_other_tools_carry_no_audit_patients if {
	d := authz.decision with input as testing.clinician_obs
	d.allow
	not "audit_patients" in object.keys(d.obligations)
}

test_the_binding_waiver_is_only_for_audit_log_tools if {
	i := testing.patched(testing.clinician_obs, {"/subject/claims/patient": "p9"})
	d := authz.decision with input as i with data.mcp_fhir.config.audit_log.bound_subject_own_patient_only as false
	[r.code | some r in d.reasons] == ["PATIENT_MISMATCH"]
}

# A data-driven test with no result passes in opa test: these pin that every case ran and passed.
test_every_audit_log_case_passes if count(test_audit_log_patient_decisions) == count(_audit_cases)

test_every_waived_case_passes if count(test_audit_log_binding_waived_by_data) == count(_waived_cases)

# ok (what allow asks) is exactly "no patient deny reason", on every input of testing.ok_inputs.
test_ok_is_no_deny_reason if {
	mismatches := {i |
		some i in testing.ok_inputs
		data.mcp_fhir.authz.patient.ok with input as i
		count(data.mcp_fhir.authz.patient.deny) > 0 with input as i
	} | {i |
		some i in testing.ok_inputs
		count(data.mcp_fhir.authz.patient.deny) == 0 with input as i
		not data.mcp_fhir.authz.patient.ok with input as i
	}
	count(mismatches) == 0
}

test_ok_fails_on_some_input if {
	some i in testing.ok_inputs
	not data.mcp_fhir.authz.patient.ok with input as i
}
