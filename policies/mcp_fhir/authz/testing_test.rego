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
