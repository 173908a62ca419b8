package mcp_fhir.authz_test

import data.mcp_fhir.authz
import data.mcp_fhir.authz.testing
import data.mcp_fhir.authz.util

_labels := data.mcp_fhir.config.labels

_all_labels := sort(util.as_set(_labels.sensitivity) | util.as_set(_labels.confidentiality))

_closed := {
	"exclude_security_labels": _all_labels,
	"allowed_categories": {},
	"redact": [],
	"max_lookback_days": 0,
	"max_results": 0,
}

_cases := {
	"clinician_searches_observations_allowed": {
		"input": testing.clinician_obs,
		"decision": {
			"allow": true,
			"reasons": [],
			"obligations": {
				"exclude_security_labels": _all_labels,
				"allowed_categories": {},
				"redact": [],
				"max_lookback_days": 36500,
				"max_results": 100,
			},
			"audit": {"sensitivity": "standard", "alerts": []},
		},
	},
	"nurse_reads_medications_denied": {
		"input": testing.req(["nurse"], ["user/*.rs"], "search_medication_requests", "search", "MedicationRequest", "p1", "treatment"),
		"decision": {
			"allow": false,
			"reasons": [{"code": "ROLE_NOT_PERMITTED", "message": "None of the subject's roles permits this operation on this resource type"}],
			"obligations": _closed,
			"audit": {"sensitivity": "standard", "alerts": []},
		},
	},
	"clinician_break_glass_allowed_restricted": {
		"input": testing.patched(testing.clinician_obs, {"/context/break_glass": {"reason": "cardiac arrest"}}),
		"decision": {
			"allow": true,
			"reasons": [],
			"obligations": {
				"exclude_security_labels": [],
				"allowed_categories": {},
				"redact": [],
				"max_lookback_days": 36500,
				"max_results": 100,
			},
			"audit": {"sensitivity": "restricted", "alerts": ["break_glass"]},
		},
	},
	"input_number_malformed": {
		"input": 5,
		"decision": {
			"allow": false,
			"reasons": [{
				"code": "INPUT_MALFORMED",
				"message": concat("", [
					"The decision input does not match the contract (action, action.operation, action.resource_type, ",
					"action.tool, context, context.time, input, resource, subject, subject.authn, subject.claims, ",
					"subject.id, subject.scopes)",
				]),
			}],
			"obligations": _closed,
			"audit": {"sensitivity": "standard", "alerts": []},
		},
	},
}

test_whole_decisions_match_expected if {
	count(_cases) == 4
	failures := {note |
		some note, case in _cases
		authz.decision != case.decision with input as case.input
	}
	print("failing cases:", failures)
	count(failures) == 0
}

test_clinician_searches_observations_allowed if {
	authz.allow with input as testing.clinician_obs
}

test_missing_input_denied_with_reason if {
	not authz.allow
	authz.decision.reasons[0].code == "INPUT_MALFORMED"
}

test_no_grant_and_no_reason_denies_policy_incomplete if {
	d := authz.decision with input as testing.clinician_obs with data.mcp_fhir.authz.scopes.covered as false
		with data.mcp_fhir.authz.scopes.deny as set()
	d.allow == false
	d.reasons[0].code == "POLICY_INCOMPLETE"
}

test_scope_categories_alone_restrict_categories if {
	i := testing.patched(testing.clinician_obs, {"/subject/scopes": ["user/Observation.s?category=laboratory,vital-signs"]})
	authz.decision.obligations.allowed_categories == {"Observation": ["laboratory", "vital-signs"]} with input as i
}

test_sensitive_release_reports_sensitive if {
	d := authz.decision with input as testing.clinician_obs
		with data.mcp_fhir.config.roles.clinician.sensitive_labels as {"treatment": ["HIV"]}
	d.audit.sensitivity == "sensitive"
	not "HIV" in d.obligations.exclude_security_labels
	d.audit.alerts == []
}

test_nurse_sensitive_release_alerts_non_clinician if {
	i := testing.req(["nurse"], ["user/*.rs"], "search_observations", "search", "Observation", "p1", "treatment")
	d := authz.decision with input as i with data.mcp_fhir.config.roles.nurse.sensitive_labels as {"treatment": ["PSY"]}
	d.allow
	d.audit.alerts == ["sensitive_access_non_clinician"]
}

test_clinician_visible_tools_exclude_audit_log if {
	tools := authz.visible_tools with input as {"subject": testing.clinician_obs.subject}
	not "search_audit_log" in tools
	"create_clinical_note" in tools
	tools == sort(tools)
}

test_nurse_visible_tools_are_patient_and_observations if {
	s := object.union(testing.clinician_obs.subject, {"claims": {"roles": ["nurse"]}})
	authz.visible_tools == ["patient_summary", "read_patient", "refresh", "search_observations"] with input as {"subject": s}
}

test_admin_visible_tools_are_audit_log_only if {
	s := object.union(testing.clinician_obs.subject, {"claims": {"roles": ["admin"]}})
	authz.visible_tools == ["audit_disclosures", "search_audit_log"] with input as {"subject": s}
}

# audit_disclosures has search_audit_log's gates: an auditor may ask about a patient, an admin may not
# (no patient_filter), a clinician not at all.
test_audit_disclosures_is_gated_like_search_audit_log if {
	cases := {
		"auditor": [["auditor"], true, set()],
		"admin": [["admin"], false, {"PATIENT_FILTER_NOT_PERMITTED"}],
		"clinician": [["clinician"], false, {"ROLE_NOT_PERMITTED"}],
	}
	failures := {name: got |
		some name, c in cases
		[roles, allow, codes] := c
		i := testing.req(roles, ["user/*.cruds"], "audit_disclosures", "search", "AuditEvent", "p1", "audit")
		d := authz.decision with input as i
		got := {"allow": d.allow, "codes": {r.code | some r in d.reasons}}
		got != {"allow": allow, "codes": codes}
	}
	count(failures) == 0
}

test_visible_tools_respect_scopes if {
	s := object.union(testing.clinician_obs.subject, {"scopes": ["patient/Patient.r"]})
	authz.visible_tools == ["patient_summary", "read_patient"] with input as {"subject": s}
}

test_visible_tools_respect_given_purpose if {
	i := {"subject": testing.clinician_obs.subject, "context": {"purpose": "medication_reconciliation"}}
	tools := authz.visible_tools with input as i
	not "search_observations" in tools
	"search_medication_requests" in tools
}

test_malformed_subject_sees_no_tools if {
	authz.visible_tools == [] with input as {"subject": {"id": 5}}
}

# allow skips the deny sets that the grants imply; it must equal the full definition (well formed,
# no reason at all, every grant) on every fixture input, allowed or denied.
_full_allow(x) if {
	data.mcp_fhir.authz.request.well_formed with input as x
	count(authz._deny) == 0 with input as x
	data.mcp_fhir.authz.tools.matches with input as x
	count(data.mcp_fhir.authz.rbac.granting_roles) > 0 with input as x
	data.mcp_fhir.authz.purpose.permitted with input as x
	data.mcp_fhir.authz.scopes.covered with input as x
}

test_allow_equals_no_reason_and_every_grant if {
	mismatches := {case.note |
		some case in data.fixtures
		authz.allow with input as case.input
		not _full_allow(case.input)
	} | {case.note |
		some case in data.fixtures
		_full_allow(case.input)
		not authz.allow with input as case.input
	}
	count(mismatches) == 0
}

# The confirm obligation comes from the tool's data: create_clinical_note by default, no other tool.
test_confirm_obligation_only_where_the_tools_data_names_it if {
	note := testing.req(["clinician"], ["user/*.cruds"], "create_clinical_note", "create", "DocumentReference", "p1", "treatment")
	d := authz.decision with input as note
	d.allow
	d.obligations.confirm == {"prompt_code": "confirm_clinical_note", "ttl_s": 120}
	o := authz.decision with input as testing.clinician_obs
	not "confirm" in object.keys(o.obligations)
	n := authz.decision with input as note with data.mcp_fhir.config.tools.create_clinical_note.confirm as null
	not "confirm" in object.keys(n.obligations)
}
