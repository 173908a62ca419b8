package mcp_fhir.authz.request_test

import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.testing

_malformed_cases := {
	"subject.id": {"/subject/id": ""},
	"subject.authn": {"/subject/authn": "password"},
	"subject.on_behalf_of": {"/subject/on_behalf_of": 7},
	"resource.patient": {"/resource/patient": 7},
	"resource.params": {"/resource/params": []},
	"context.purpose": {"/context/purpose": ["treatment"]},
	"context.break_glass": {"/context/break_glass": "yes"},
	"context.backend": {"/context/backend": 1},
	"context.time": {"/context/time": "2025-06-03 01:00:00"},
}

test_each_malformed_field_is_named if {
	failures := {field |
		some field, ops in _malformed_cases
		not field in request.malformed with input as testing.patched(testing.clinician_obs, ops)
	}
	count(failures) == 0
}

test_well_formed_input_has_no_deny if {
	count(request.deny) == 0 with input as testing.clinician_obs
}

test_empty_input_denied_malformed if {
	some r in request.deny with input as {}
	r.code == "INPUT_MALFORMED"
}

test_valid_times_accepted if {
	every t in ["2024-02-29T00:00:00Z", "2000-02-29T10:00:00.123+10:00", "2025-12-31T23:59:59-05:30"] {
		request.valid_time(t)
	}
}

test_invalid_times_rejected if {
	every t in ["2023-02-29T00:00:00Z", "1900-02-29T00:00:00Z", "9999-01-01T00:00:00Z", "2025-04-31T00:00:00Z", "2025-06-03T24:00:00Z", "2100-02-29T00:00:00Z", "1677-12-31T00:00:00Z", 5] {
		not request.valid_time(t)
	}
}

test_normalised_values_follow_input if {
	request.patient == "p1" with input as testing.clinician_obs
	request.params == {} with input as testing.clinician_obs
	request.context_given with input as testing.clinician_obs
	request.time_ns == time.parse_rfc3339_ns(testing.business_time) with input as testing.clinician_obs
}

test_params_object_is_passed_through if {
	i := testing.patched(testing.clinician_obs, {"/resource/params": {"category": "laboratory"}})
	request.params == {"category": "laboratory"} with input as i
}

test_subject_only_input_is_subject_well_formed if {
	request.subject_well_formed with input as {"subject": testing.clinician_obs.subject}
	not request.well_formed with input as {"subject": testing.clinician_obs.subject}
}

test_well_formed_is_exactly_no_malformed_field if {
	inputs := array.concat(
		[testing.clinician_obs, {}, 5, {"subject": testing.clinician_obs.subject}],
		[testing.patched(testing.clinician_obs, ops) | some ops in _malformed_cases],
	)
	mismatches := {i |
		some i, x in inputs
		request.well_formed with input as x
		count(request.malformed) > 0 with input as x
	} | {i |
		some i, x in inputs
		not request.well_formed with input as x
		count(request.malformed) == 0 with input as x
	}
	count(mismatches) == 0
}

# well_formed and subject_well_formed write the malformed checks out in one body each; on every
# input of the table (well formed, each malformed field, white-space-only strings, escapes, activity
# shapes) they agree with malformed and malformed_subject.
_string_variants := [
	"", " ", "\t\n", "\u000b", "\u00a0", "\u0085", "\u2003", "\u2028", "\u200b", "\u003c",
	"a", " a ", "\"", "\\", "\b", "\u0001", "\u00e9", "\u3000x", "\u0000",
]

_activity_variants := [
	null, {}, {"60": {"calls": 1, "denials": 0, "distinct_patients": 1}},
	{"60": {"calls": 1, "denials": 0, "distinct_patients": 1}, "600": {"calls": 9, "denials": 2, "distinct_patients": 3}},
	[], "x", {"6o": {"calls": 1, "denials": 0, "distinct_patients": 1}}, {"60": {"calls": 1, "denials": 0}},
	{"60": {"calls": -1, "denials": 0, "distinct_patients": 1}}, {"60": {"calls": 1.5, "denials": 0, "distinct_patients": 1}},
	{"60": {"calls": 1, "denials": 0, "distinct_patients": 1, "x": 0}}, {"60": []},
]

_table := array.concat(
	[testing.patched(testing.clinician_obs, {"/context/activity": a}) | some a in _activity_variants],
	_base_table,
)

_base_table := array.concat(
	[testing.clinician_obs, {}, 5, {"subject": testing.clinician_obs.subject}],
	array.concat(
		[testing.patched(testing.clinician_obs, ops) | some ops in _malformed_cases],
		[testing.patched(testing.clinician_obs, {path: json.unmarshal(concat("", ["\"", v, "\""]))}) |
			some v in _string_variants
			some path in ["/subject/id", "/action/tool", "/resource/patient", "/context/purpose"]
		],
	),
)

test_well_formed_agrees_with_malformed[i] if {
	some i, x in _table
	_wf(x) == _no_malformed(x)
	_swf(x) == _no_malformed_subject(x)
}

test_the_table_holds_both_outcomes if {
	some x in _table
	_wf(x)
	some y in _table
	not _wf(y)
}

_wf(x) := b if b := request.well_formed with input as x

_swf(x) := b if b := request.subject_well_formed with input as x

_no_malformed(x) := b if b := count(request.malformed) == 0 with input as x

_no_malformed_subject(x) := b if b := count(request.malformed_subject) == 0 with input as x

test_every_contract_case_passes if count(test_well_formed_agrees_with_malformed) == count(_table)
