package mcp_fhir.authz.rbac_test

import data.mcp_fhir.authz.rbac
import data.mcp_fhir.authz.testing

_cfg := data.mcp_fhir.config.claims

_roles := data.mcp_fhir.config.roles

_with_claims(claims) := testing.patched(testing.clinician_obs, {"/subject/claims": claims})

test_roles_claim_maps_to_roles if {
	rbac.roles == {"nurse", "clinician"} with input as _with_claims({"roles": ["nurse", "clinician", "x", 5]})
}

test_roles_claim_name_is_configurable if {
	cfg := object.union(_cfg, {"roles": "groups"})
	i := _with_claims({"groups": ["auditor"], "roles": ["admin"]})
	rbac.roles == {"auditor"} with input as i with data.mcp_fhir.config.claims as cfg
}

test_roles_claim_not_a_list_grants_nothing if {
	rbac.roles == set() with input as _with_claims({"roles": "clinician"})
}

test_roles_of_a_malformed_subject_are_none if {
	rbac.roles == set() with input as testing.patched(testing.clinician_obs, {"/subject/claims": []})
}

test_clinician_cannot_write_medications if {
	w := testing.req(["clinician"], ["user/*.cruds"], "create_clinical_note", "create", "MedicationRequest", "p1", "treatment")
	rbac.permitting_roles == set() with input as w
	d := testing.patched(w, {"/action/resource_type": "DocumentReference"})
	rbac.permitting_roles == {"clinician"} with input as d
}

test_nurse_writes_nothing if {
	count(_roles.nurse.write) == 0
}

test_admin_and_auditor_read_only_audit_events if {
	_roles.admin.read == ["AuditEvent"]
	_roles.auditor.read == ["AuditEvent"]
}

test_admin_and_auditor_together_get_auditor_view if {
	i := testing.req(["admin", "auditor"], ["user/*.rs"], "search_audit_log", "search", "AuditEvent", null, "audit")
	rbac.granting_roles == {"admin", "auditor"} with input as i
	rbac.role_redact == set() with input as i
}

test_admin_alone_has_entity_redacted if {
	i := testing.req(["admin"], ["user/*.rs"], "search_audit_log", "search", "AuditEvent", null, "audit")
	rbac.role_redact == {"AuditEvent.entity"} with input as i
}

test_no_role_denied if {
	i := testing.req([], ["user/*.rs"], "search_observations", "search", "Observation", "p1", "treatment")
	{r.code | some r in rbac.deny with input as i} == {"NO_ROLE"}
}

test_nurse_under_discharge_summary_denied_role_purpose if {
	i := testing.req(["nurse"], ["user/*.rs"], "search_observations", "search", "Observation", "p1", "discharge_summary")
	{r.code | some r in rbac.deny with input as i} == {"ROLE_PURPOSE_NOT_PERMITTED"}
}

# granting_roles is written from roles; it is the permitting roles that list the effective purpose
# on every fixture input and every input of testing.ok_inputs.
_granting_from_permitting := {r |
	some r in rbac.permitting_roles
	data.mcp_fhir.authz.purpose.effective in _roles[r].purposes
}

test_granting_roles_are_the_permitting_roles_listing_the_purpose if {
	inputs := {case.input | some case in data.fixtures} | {i | some i in testing.ok_inputs}
	mismatches := {x |
		some x in inputs
		g := rbac.granting_roles with input as x
		g != _granting_from_permitting with input as x
	}
	count(mismatches) == 0
	some y in inputs
	count(rbac.granting_roles) > 0 with input as y
}
