package mcp_fhir.authz.consent_test

import data.mcp_fhir.authz
import data.mcp_fhir.authz.testing

# clinician_obs: a clinician (acting for Practitioner/123 below) searches p1's observations for
# treatment on 2025-06-03.
_base := testing.patched(testing.clinician_obs, {"/subject/on_behalf_of": "Practitioner/123"})

_with(consent) := testing.patched(_base, {"/context/consent": consent})

_ok(provisions) := {"status": "ok", "provisions": provisions}

_deny(extra) := object.union({"type": "deny"}, extra)

_glass(i) := testing.patched(i, {"/context/break_glass": {"reason": "arrest"}})

# Every label withheld by default except PSY: what break-glass releases, less a PSY restriction.
_all_labels := sort(array.concat(data.mcp_fhir.config.labels.sensitivity, data.mcp_fhir.config.labels.confidentiality))

_cases := {
	"no consent: allowed": {"input": _base, "codes": [], "excluded": _all_labels},
	"consent with no provisions: allowed": {"input": _with(_ok([])), "codes": [], "excluded": _all_labels},
	"AI-processing opt-out: denied": {"input": _with(_ok([_deny({"purpose": ["AIPROCESS"]})])), "codes": ["CONSENT_DENIED"]},
	"deny for every purpose and actor: denied": {"input": _with(_ok([_deny({})])), "codes": ["CONSENT_DENIED"]},
	"deny for treatment: denied": {"input": _with(_ok([_deny({"purpose": ["TREAT"]})])), "codes": ["CONSENT_DENIED"]},
	"deny for operations only: no effect": {"input": _with(_ok([_deny({"purpose": ["HOPERAT"]})])), "codes": [], "excluded": _all_labels},
	"deny naming this practitioner: denied": {"input": _with(_ok([_deny({"actor": ["Practitioner/123"]})])), "codes": ["CONSENT_DENIED"]},
	"deny naming another practitioner: no effect": {"input": _with(_ok([_deny({"actor": ["Practitioner/999"]})])), "codes": [], "excluded": _all_labels},
	"deny naming the AI-agent actor role: denied": {"input": _with(_ok([_deny({"actor_roles": ["ai-agent"]})])), "codes": ["CONSENT_DENIED"]},
	"deny naming another actor role only: no effect": {"input": _with(_ok([_deny({"actor_roles": ["PRCP"]})])), "codes": [], "excluded": _all_labels},
	"deny naming another practitioner by reference and role: no effect": {
		"input": _with(_ok([_deny({"actor": ["Practitioner/999"], "actor_roles": ["ai-agent"]})])), "codes": [], "excluded": _all_labels,
	},
	"deny of observations: denied": {"input": _with(_ok([_deny({"classes": ["Observation"]})])), "codes": ["CONSENT_DENIED"]},
	"deny of documents (My Health Record style record-access restriction): observations unaffected": {
		"input": _with(_ok([_deny({"classes": ["DocumentReference"]})])), "codes": [], "excluded": _all_labels,
	},
	"expired opt-out: no effect": {
		"input": _with(_ok([_deny({"purpose": ["AIPROCESS"], "period": {"start": "2020-01-01T00:00:00Z", "end": "2024-12-31T00:00:00Z"}})])),
		"codes": [], "excluded": _all_labels,
	},
	"opt-out from next year: no effect yet": {
		"input": _with(_ok([_deny({"period": {"start": "2026-01-01T00:00:00Z", "end": null}})])),
		"codes": [], "excluded": _all_labels,
	},
	"opt-out inside its period: denied": {
		"input": _with(_ok([_deny({"period": {"start": "2025-01-01T00:00:00Z", "end": "2025-12-31T00:00:00Z"}})])),
		"codes": ["CONSENT_DENIED"],
	},
	"permit of every label: never widens": {
		"input": _with(_ok([{"type": "permit", "security_labels": ["PSY", "HIV"]}])), "codes": [], "excluded": _all_labels,
	},
	"PSY restricted, break-glass: PSY still withheld": {
		"input": _glass(_with(_ok([_deny({"security_labels": ["PSY"]})]))), "codes": [], "excluded": ["PSY"],
	},
	"PSY restricted for documents only, break-glass on observations: nothing withheld": {
		"input": _glass(_with(_ok([_deny({"security_labels": ["PSY"], "classes": ["DocumentReference"]})]))), "codes": [], "excluded": [],
	},
	"opt-out, break-glass: consent holds by default": {
		"input": _glass(_with(_ok([_deny({"purpose": ["AIPROCESS"]})]))), "codes": ["CONSENT_DENIED"],
	},
	"consent unavailable: denied": {"input": _with({"status": "unavailable"}), "codes": ["CONSENT_UNAVAILABLE"]},
}

test_consent_decisions[note] if {
	some note, case in _cases
	d := authz.decision with input as case.input
	sort([r.code | some r in d.reasons]) == case.codes
	_excluded_agree(d, case)
}

_excluded_agree(d, case) if {
	d.allow
	d.obligations.exclude_security_labels == case.excluded
}

_excluded_agree(d, case) if {
	not d.allow
	count(case.codes) > 0
}

test_restricted_label_withheld_even_when_the_role_releases_it_for_treatment if {
	i := _with(_ok([_deny({"security_labels": ["PSY"]})]))
	released := authz.decision with input as _base with data.mcp_fhir.config.roles.clinician.sensitive_labels as {"treatment": ["PSY", "HIV"]}
	not "PSY" in released.obligations.exclude_security_labels
	d := authz.decision with input as i with data.mcp_fhir.config.roles.clinician.sensitive_labels as {"treatment": ["PSY", "HIV"]}
	"PSY" in d.obligations.exclude_security_labels
	not "HIV" in d.obligations.exclude_security_labels
}

test_break_glass_overrides_consent_only_where_data_says_so_and_alerts if {
	i := _glass(_with(_ok([_deny({"purpose": ["AIPROCESS"]}), _deny({"security_labels": ["PSY"]})])))
	d := authz.decision with input as i with data.mcp_fhir.config.consent.break_glass_overrides as true
	d.allow
	d.obligations.exclude_security_labels == []
	d.audit.alerts == ["break_glass", "consent_override"]
}

test_malformed_consent_is_named[note] if {
	some note, consent in _malformed_consents
	d := authz.decision with input as _with(consent)
	[r.code | some r in d.reasons] == ["INPUT_MALFORMED"]
	contains(d.reasons[0].message, "context.consent")
}

_malformed_consents := {
	"not an object": "yes",
	"unknown status": {"status": "maybe"},
	"provisions not a list": {"status": "ok", "provisions": {}},
	"unknown provision type": _ok([{"type": "maybe"}]),
	"labels not strings": _ok([_deny({"security_labels": [1]})]),
	"period end not RFC 3339": _ok([_deny({"period": {"end": "tomorrow"}})]),
}

# A data-driven test with no result passes in opa test: these pin that every case ran and passed.
test_every_consent_case_passes if count(test_consent_decisions) == count(_cases)

test_every_malformed_consent_is_named if count(test_malformed_consent_is_named) == count(_malformed_consents)

# ok (what allow asks) is exactly "no consent deny reason", on every input of testing.ok_inputs.
test_ok_is_no_deny_reason if {
	mismatches := {i |
		some i in testing.ok_inputs
		data.mcp_fhir.authz.consent.ok with input as i
		count(data.mcp_fhir.authz.consent.deny) > 0 with input as i
	} | {i |
		some i in testing.ok_inputs
		count(data.mcp_fhir.authz.consent.deny) == 0 with input as i
		not data.mcp_fhir.authz.consent.ok with input as i
	}
	count(mismatches) == 0
}

test_ok_fails_on_some_input if {
	some i in testing.ok_inputs
	not data.mcp_fhir.authz.consent.ok with input as i
}
