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
			"valid_for_s": 300,
		},
	},
	"nurse_reads_medications_denied": {
		"input": testing.req(["nurse"], ["user/*.rs"], "search_medication_requests", "search", "MedicationRequest", "p1", "treatment"),
		"decision": {
			"allow": false,
			"reasons": [{"code": "ROLE_NOT_PERMITTED", "message": "None of the subject's roles permits this operation on this resource type"}],
			"obligations": _closed,
			"audit": {"sensitivity": "standard", "alerts": []},
			"valid_for_s": 300,
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
			"valid_for_s": 300,
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
			"valid_for_s": 0,
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

test_admin_visible_tools_are_the_audit_log_tools_only if {
	s := object.union(testing.clinician_obs.subject, {"claims": {"roles": ["admin"]}})
	authz.visible_tools == ["audit_disclosures", "search_audit_log"] with input as {"subject": s}
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

# allow asks for a granting role and purpose.permitted instead of the request's rbac.grants triple;
# the two agree on every fixture input and every input of testing.ok_inputs.
_grant_triple(x) if {
	acc := data.mcp_fhir.authz.purpose.access with input as x
	rt := data.mcp_fhir.authz.request.resource_type with input as x
	p := data.mcp_fhir.authz.purpose.effective with input as x
	data.mcp_fhir.authz.rbac.grants[[acc, rt, p]] with input as x
}

_granting_and_permitted(x) if {
	count(data.mcp_fhir.authz.rbac.granting_roles) > 0 with input as x
	data.mcp_fhir.authz.purpose.permitted with input as x
}

test_granting_role_and_permitted_equal_the_grant_triple if {
	inputs := {case.input | some case in data.fixtures} | {i | some i in testing.ok_inputs}
	mismatches := {x | some x in inputs; _grant_triple(x); not _granting_and_permitted(x)} | {x |
		some x in inputs
		_granting_and_permitted(x)
		not _grant_triple(x)
	}
	count(mismatches) == 0
	some y in inputs
	_grant_triple(y)
}

# valid_for_s: up to the next business-hours boundary (less a second for the instant's fraction),
# capped by defaults.decision_valid_for_s; Sydney is UTC+10 in June, UTC+11 in December.
test_valid_for_s_shortens_near_a_boundary[note] if {
	some note, case in _valid_for_cases
	[t, want] := case
	i := testing.patched(testing.clinician_obs, {"/context/time": t})
	d := authz.decision with input as i
	d.valid_for_s == want
}

test_every_valid_for_case_passes if count(test_valid_for_s_shortens_near_a_boundary) == count(_valid_for_cases)

_valid_for_cases := {
	"mid-morning: the cap": ["2025-06-03T01:00:00Z", 300],
	"a minute before 18:00": ["2025-06-03T07:59:00Z", 59],
	"at 17:59:59.5": ["2025-06-03T07:59:59.5Z", 0],
	"after hours, two minutes to midnight": ["2025-06-03T13:58:00Z", 119],
	"before hours on a weekday: until 08:00": ["2025-06-02T21:58:30Z", 89],
	"Saturday 07:59: until midnight, not 08:00": ["2025-06-06T21:59:00Z", 300],
	"Saturday 23:59:30": ["2025-06-07T13:59:30Z", 29],
	"daylight saving, 17:58 Sydney": ["2025-12-02T06:58:00Z", 119],
}

test_valid_for_s_when_the_derived_table_is_stale if {
	i := testing.patched(testing.clinician_obs, {"/context/time": "2025-06-03T07:58:00Z"})
	d := authz.decision with input as i with data.mcp_fhir.config.hours.end as "17:59"
	d.valid_for_s == 59
	d.audit.alerts == []
	e := authz.decision with input as i with data.mcp_fhir.config.hours.days as ["Monday"]
	e.valid_for_s == 300
	e.audit.alerts == ["after_hours"]
}

test_valid_for_s_is_zero_on_a_denied_malformed_input if {
	d := authz.decision with input as {}
	d.valid_for_s == 0
}

# The derived tables (mcp-fhir policy build) are a cache of the YAML: the policy uses them only while
# their source equals the live data, and without them every decision and listing is the same.
test_derived_tables_are_fresh if {
	some _, _ in data.mcp_fhir.derived.source
	every section, value in data.mcp_fhir.derived.source {
		data.mcp_fhir.config[section] == value
	}
}

test_decisions_are_the_same_without_the_derived_tables if {
	differ := {case.note |
		some i, case in data.fixtures
		i % 5 == 0 # a sample across the corpus: this test runs every decision twice
		fast := authz.decision with input as case.input
		slow := authz.decision with input as case.input with data.mcp_fhir.derived as {}
		fast != slow
	}
	count(differ) == 0
}

test_visible_tools_are_the_same_without_the_derived_tables if {
	subjects := [
		testing.clinician_obs.subject,
		object.union(testing.clinician_obs.subject, {"claims": {"roles": ["nurse"]}, "scopes": ["user/Patient.rs", "patient/Observation.s"]}),
		object.union(testing.clinician_obs.subject, {"claims": {"roles": ["auditor", "nurse"]}}),
	]
	differ := {[i, ctx] |
		some i, subject in subjects
		some ctx in [{}, {"purpose": "treatment"}]
		fast := authz.visible_tools with input as {"subject": subject, "context": ctx}
		slow := authz.visible_tools with input as {"subject": subject, "context": ctx} with data.mcp_fhir.derived as {}

		# only the visible table stale: the tools and operations tables still serve the computation
		mixed := authz.visible_tools with input as {"subject": subject, "context": ctx} with data.mcp_fhir.derived.source.roles as {}
		{fast, mixed} != {slow}
	}
	count(differ) == 0
	listed := authz.visible_tools with input as {"subject": subjects[2]}
	count(listed) > 0
}

# _wildcard_tools: the entries' tools whose letter a "*" scope grants; none without a "*" scope.
test_wildcard_tools[note] if {
	entries := [["Observation", "s", ["search_observations"]], ["Patient", "r", ["read_patient"]]]
	some note, case in {
		"a * scope grants s": [{["*", "s"]}, {"search_observations"}],
		"a * scope grants both": [{["*", "s"], ["*", "r"], ["Patient", "r"]}, {"search_observations", "read_patient"}],
		"typed scopes only": [{["Observation", "s"], ["Patient", "r"]}, set()],
		"a * scope with another letter": [{["*", "c"]}, set()],
	}
	[pairs, want] := case
	authz._wildcard_tools(entries, pairs) == want
}

test_every_wildcard_tools_case_passes if count(test_wildcard_tools) == 4

# _deny skips a package's deny set when a positive fact rules out its reasons; on every well-formed
# input of testing.ok_inputs it must equal the union of every package's deny set.
test_deny_is_the_union_of_every_deny_set if {
	mismatches := {i |
		some i in testing.ok_inputs
		data.mcp_fhir.authz.request.well_formed with input as i
		full := _all_deny with input as i
		authz._deny != full with input as i
	}
	count(mismatches) == 0
}

_all_deny := ((((((data.mcp_fhir.authz.tools.deny | data.mcp_fhir.authz.rbac.deny) | data.mcp_fhir.authz.purpose.deny) | data.mcp_fhir.authz.patient.deny) | data.mcp_fhir.authz.scopes.deny) | data.mcp_fhir.authz.sensitivity.deny) | data.mcp_fhir.authz.consent.deny) | authz.deny

# Every package's deny set is non-empty on some input of testing.ok_inputs (the test above compares
# more than empty sets).
test_ok_inputs_reach_every_deny_set[pkg] if {
	some pkg in ["tools", "rbac", "purpose", "patient", "scopes", "sensitivity", "consent"]
	some i in testing.ok_inputs
	count(data.mcp_fhir.authz[pkg].deny) > 0 with input as i
}

test_every_deny_set_is_reached if count(test_ok_inputs_reach_every_deny_set) == 7

# _granted_obligations skips the audit and confirm unions in the common case; on every allowed input
# of testing.ok_inputs it equals the base obligations joined with both.
test_granted_obligations_are_base_audit_and_confirm if {
	mismatches := {i |
		some i in testing.ok_inputs
		authz.allow with input as i
		full := object.union(object.union(authz._base_obligations, authz._audit_obligations), authz._confirm_obligations) with input as i
		authz._granted_obligations != full with input as i
	}
	count(mismatches) == 0
}

# ok_inputs allow an audit-log tool and a tool with confirm (the comparison above covers both).
test_ok_inputs_allow_audit_and_confirm_tools if {
	some i in testing.ok_inputs
	authz.decision.obligations.confirm with input as i
	some j in testing.ok_inputs
	"audit_patients" in object.keys(authz.decision.obligations) with input as j
}
