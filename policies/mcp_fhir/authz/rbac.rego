# METADATA
# title: Roles
# description: >-
#   Roles come from the credential's claims through the mapping in claims data; Python never
#   computes a role. A role permits read (read, search) or write (create, update) per resource
#   type and lists the purposes it may act under.
package mcp_fhir.authz.rbac

import data.mcp_fhir.authz.purpose
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.claims as _claims_cfg
import data.mcp_fhir.config.purposes as _purposes_data
import data.mcp_fhir.config.roles as _roles_data

default roles := set()

# roles: the known roles that the configured roles claim (a list of strings) maps to.
roles := {role |
	values := request.claims[_claims_cfg.roles]
	is_array(values)
	some value in values
	is_string(value)
	role := _claims_cfg.role_map[value]
	_roles_data[role]
}

# permitting_roles grant this access on this resource type, whatever the purpose.
permitting_roles := {r | some r in roles; request.resource_type in _roles_data[r][purpose.access]}

# granting_roles grant this access on this resource type AND list the effective purpose.
granting_roles := {r | some r in permitting_roles; purpose.effective in _roles_data[r].purposes}

# grants: the [access kind, resource type, purpose] triples the subject holds: some role of the
# subject permits the access on the type and lists the purpose, and that purpose covers the access
# kind and the type. The one definition of a grant: decision asks for its request's triple (a point
# lookup, the rule body evaluated with the triple bound), visible_tools enumerates them.
grants contains [acc, rt, p] if {
	some r in roles
	role := _roles_data[r]
	some p in role.purposes
	def := _purposes_data[p]
	some acc in def.access
	some rt in role[acc]
	def.resource_types[rt]
}

# role_redact: what every granting role redacts (the most permissive granting role wins).
default role_redact := set()

role_redact := intersection({util.as_set(_roles_data[r].redact) | some r in granting_roles})

# role_definition gives the data entry of a role (for other packages).
role_definition(r) := _roles_data[r]

# METADATA
# title: No role
# description: The credential carries no role known to the policy
# custom:
#   code: NO_ROLE
deny contains util.reason(rego.metadata.rule()) if count(roles) == 0

# METADATA
# title: Role not permitted
# description: None of the subject's roles permits this operation on this resource type
# custom:
#   code: ROLE_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	count(roles) > 0
	count(permitting_roles) == 0
}

# METADATA
# title: Purpose not permitted for role
# description: No role that permits this action may act under the effective purpose
# custom:
#   code: ROLE_PURPOSE_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	purpose.definition
	count(permitting_roles) > 0
	count(granting_roles) == 0
}
