# METADATA
# title: Sensitivity labels and break-glass
# description: >-
#   Sensitive (ActCode) and confidentiality R/V labels are excluded unless a granting role
#   releases some for the effective purpose, or a role with break_glass invokes break-glass
#   with a reason. Break-glass by any other role is denied, never ignored.
package mcp_fhir.authz.sensitivity

import data.mcp_fhir.authz.consent
import data.mcp_fhir.authz.purpose
import data.mcp_fhir.authz.rbac
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.labels as _labels
import data.mcp_fhir.config.roles as _roles_data
import data.mcp_fhir.derived as _derived

# all_labels is every label withheld by default: from the derived table (mcp-fhir policy build)
# while it is fresh, else computed from the YAML.
all_labels := object.keys(_derived.label_set) if {
	_labels_fresh
} else := util.as_set(_labels.sensitivity) | util.as_set(_labels.confidentiality)

# sorted_labels: all_labels, sorted (the closed obligations' exclude_security_labels).
sorted_labels := _derived.labels if {
	_labels_fresh
} else := sort(all_labels)

# The labels table was derived from the live labels (not stale, not replaced in a test).
_labels_fresh if _derived.source.labels == _labels

_break_glass_roles := {r | some r in rbac.granting_roles; _roles_data[r].break_glass == true}

default break_glass_invoked := false

# break_glass_invoked: the caller asked for break-glass with a non-empty reason.
break_glass_invoked if {
	request.break_glass_requested
	request.break_glass_reason_given
}

default break_glass_active := false

# break_glass_active: break-glass is invoked and a granting role may use it.
break_glass_active if {
	break_glass_invoked
	count(_break_glass_roles) > 0
}

# released: labels a granting role releases for the effective purpose without break-glass.
released := {label |
	some r in rbac.granting_roles
	some label in object.get(_roles_data[r].sensitive_labels, purpose.effective, [])
	label in all_labels
}

# excluded: the exclude_security_labels obligation for an allowed request.
# Labels the patient's consent withholds are excluded whatever the role releases.
excluded := util.as_set(_labels.break_glass_excluded) | consent.excluded_labels if break_glass_active

else := (all_labels - released) | consent.excluded_labels

# let_through: withheld-by-default labels this decision lets through.
let_through := all_labels - excluded

_clinical_grant if {
	some r in rbac.granting_roles
	_roles_data[r].clinical == true
}

default non_clinician_release := false

# non_clinician_release: sensitive labels reach a subject with no clinical granting role.
non_clinician_release if {
	count(let_through) > 0
	not _clinical_grant
}

default ok := false

# ok: no break-glass deny reason (count(deny) == 0; sensitivity_test.rego pins the two together).
# Both deny rules need a break_glass object, so without one they are not evaluated.
ok if {
	not request.break_glass_requested
} else if {
	count(deny) == 0
}

# METADATA
# title: Break-glass reason required
# description: Break-glass needs a non-empty reason
# custom:
#   code: BREAK_GLASS_REASON_REQUIRED
deny contains util.reason(rego.metadata.rule()) if {
	request.break_glass_requested
	not request.break_glass_reason_given
}

# METADATA
# title: Break-glass not permitted
# description: None of the subject's roles that permit this action may invoke break-glass
# custom:
#   code: BREAK_GLASS_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	break_glass_invoked
	count(_break_glass_roles) == 0
}
