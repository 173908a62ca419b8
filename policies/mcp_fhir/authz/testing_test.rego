# METADATA
# title: Shared test inputs
# description: A well-formed base input and a helper to vary it; used by every *_test.rego.
package mcp_fhir.authz.testing

# Tuesday 11:00 Australia/Sydney.
business_time := "2025-06-03T01:00:00Z"

# req builds a decision input; args: roles, scopes, tool, operation, resource type, patient, purpose.
req(roles, scopes, tool, op, rt, patient, purpose) := {
	"subject": {
		"id": "agent-1",
		"authn": "oauth",
		"claims": {"roles": roles},
		"scopes": scopes,
		"on_behalf_of": null,
	},
	"action": {"tool": tool, "operation": op, "resource_type": rt},
	"resource": {"patient": patient, "params": {}},
	"context": {
		"purpose": purpose,
		"time": business_time,
		"break_glass": null,
		"backend": "default",
		"request_id": "req-1",
	},
}

# clinician_obs: a clinician searching observations for treatment (allowed by default).
clinician_obs := req(["clinician"], ["user/*.cruds"], "search_observations", "search", "Observation", "p1", "treatment")

# patched applies JSON-patch style replacements to an input.
patched(base, ops) := json.patch(base, [{"op": "add", "path": p, "value": v} | some p, v in ops])

test_req_builds_a_well_formed_input if {
	data.mcp_fhir.authz.request.well_formed with input as clinician_obs
}

# ok_inputs: every fixture input plus variants that reach each package's less common deny rules
# (bound patient, break-glass, consent, categories, activity); the *_test.rego files pin each
# package's ok to "its deny set is empty" on all of them.
ok_inputs := {case.input | some case in data.fixtures} | {patched(clinician_obs, ops) | some ops in _ok_variants}

_ok_variants := [
	{},
	{"/subject/claims/patient": "Patient/p1"},
	{"/subject/claims/patient": "p9"},
	{"/subject/claims/patient": 5},
	{"/resource/patient": null},
	{"/action/resource_type": "AuditEvent", "/action/tool": "search_audit_log", "/context/purpose": "audit", "/subject/claims/roles": ["auditor"]},
	{"/action/resource_type": "AuditEvent", "/action/tool": "search_audit_log", "/context/purpose": "audit", "/subject/claims/roles": ["admin"]},
	{"/action/resource_type": "AuditEvent", "/action/tool": "search_audit_log", "/context/purpose": "audit", "/subject/claims/roles": ["auditor"], "/subject/claims/patient": "p9"},
	{"/context/break_glass": {"reason": "arrest"}},
	{"/context/break_glass": {"reason": ""}},
	{"/context/break_glass": {}},
	{"/subject/claims/roles": ["nurse"], "/context/break_glass": {"reason": "arrest"}},
	{"/context/consent": {"status": "unavailable"}},
	{"/context/consent": {"status": "ok", "provisions": []}},
	{"/context/consent": {"status": "ok", "provisions": [{"type": "deny"}]}},
	{"/context/consent": {"status": "ok", "provisions": [{"type": "deny", "security_labels": ["PSY"]}]}},
	{"/context/consent": {"status": "ok", "provisions": [{"type": "deny"}]}, "/context/break_glass": {"reason": "arrest"}},
	{"/resource/params": {"category": "laboratory"}},
	{"/resource/params": {"category": "social-history"}},
	{"/subject/scopes": ["user/Observation.rs?category=laboratory"]},
	{"/subject/scopes": ["user/Observation.rs?category=laboratory"], "/resource/params": {"category": "vital-signs"}},
	{"/context/purpose": "research"},
	{"/action/tool": "create_clinical_note", "/action/operation": "create", "/action/resource_type": "DocumentReference"},
	{"/context/activity": {"600": {"calls": 40, "denials": 0, "distinct_patients": 21}}},
	{"/context/activity": {"60": {"calls": 12, "denials": 10, "distinct_patients": 1}}},
]

test_ok_inputs_reach_allow_and_deny if {
	some i in ok_inputs
	data.mcp_fhir.authz.allow with input as i
	some j in ok_inputs
	not data.mcp_fhir.authz.allow with input as j
}
