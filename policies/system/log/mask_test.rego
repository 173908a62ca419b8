package system.log_test

import data.system.log

_event := {"input": {
	"subject": {"id": "agent-1", "claims": {"roles": ["clinician"], "name": "Jane Citizen", "patient": "p1", "email": "j@example.org"}},
	"resource": {"patient": "p1", "params": {"category": "laboratory", "note": "free text about the patient"}},
	"context": {"break_glass": {"reason": "patient collapsed"}},
}}

test_patient_and_free_text_masked if {
	m := log.mask with input as _event
	m == {
		"/input/resource/patient",
		"/input/context/break_glass/reason",
		"/input/context/consent",
		"/input/resource/params/note",
		"/input/subject/claims/name",
		"/input/subject/claims/patient",
		"/input/subject/claims/email",
	}
}

test_keys_needing_escape_mask_the_whole_object if {
	e := {"input": {"subject": {"claims": {"a/b": 1}}, "resource": {"params": {"x~y": 1}}}}
	m := log.mask with input as e
	"/input/subject/claims" in m
	"/input/resource/params" in m
}

test_kept_claims_and_params_not_masked if {
	m := log.mask with input as _event
	not "/input/subject/claims/roles" in m
	not "/input/resource/params/category" in m
}

test_a_params_array_with_elements_is_masked_whole if {
	m := log.mask with input as {"input": {"resource": {"params": ["free text"]}}}
	m == {"/input/resource/patient", "/input/context/break_glass/reason", "/input/context/consent", "/input/resource/params"}
}

test_an_unsafe_key_masks_the_object_and_each_other_key if {
	m := log.mask with input as {"input": {"subject": {"claims": {"a/b": 1, "name": "x", "roles": []}}}}
	m == {
		"/input/resource/patient", "/input/context/break_glass/reason", "/input/context/consent",
		"/input/subject/claims", "/input/subject/claims/name",
	}
}
