# METADATA
# title: Patient binding
# description: >-
#   Patient data always needs a patient. A subject bound to a patient (launch-context claim)
#   never reaches another patient. Naming a patient on non-patient data (the audit log) needs
#   a granting role with patient_filter.
package mcp_fhir.authz.patient

import data.mcp_fhir.authz.rbac
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.audit_log as _audit_log
import data.mcp_fhir.config.claims.patient as _claim_name
import data.mcp_fhir.config.defaults.non_patient_resource_types as _non_patient_types
import data.mcp_fhir.config.roles as _roles_data

# canonical strips a leading "Patient/" so "Patient/123" and "123" compare equal.
canonical(id) := trim_prefix(id, "Patient/")

default patient_data := false

# patient_data holds for every resource type except the configured non-patient ones.
patient_data if not request.resource_type in _non_patient_types

# The subject is bound when the claim is present with any non-null value.
bound if object.get(request.claims, _claim_name, null) != null

_bound_patient := canonical(request.claims[_claim_name]) if util.non_empty_string(request.claims[_claim_name])

_same_patient if {
	is_string(request.patient)
	canonical(request.patient) == _bound_patient
}

_patient_given if request.patient != null

# audit_patients: the audit_patients obligation of an allowed audit-log call (audit_log/data.yaml):
# [] when no granting role sees events about patients; the named patient when the call filters
# (the patient rules above already decided that it may); the subject's own patient when it is bound
# and bound_subject_own_patient_only holds ([] when the binding claim is unreadable); else null,
# every patient. Ids are canonical ("Patient/" prefix removed).
audit_patients := [] if {
	not _patient_events_visible
} else := [canonical(request.patient)] if {
	_patient_given
} else := [_bound_patient] if {
	_binding_applies
} else := [] if {
	_binding_applies
} else := null

_patient_events_visible if {
	some r in rbac.granting_roles
	_roles_data[r].audit_patient_events == true
}

_binding_applies if {
	bound
	not _binding_waived
}

# The audit-log data lets a patient-bound subject see other patients' events.
_binding_waived if {
	request.tool in _audit_log.tools
	_audit_log.bound_subject_own_patient_only == false
}

default ok := false

# ok: no patient deny reason (count(deny) == 0; patient_test.rego pins the two together). The
# common case first (patient data, a patient named, no binding), where no deny rule can apply;
# only otherwise are the deny rules evaluated.
ok if {
	not request.resource_type in _non_patient_types # patient_data, written out
	request.patient != null # _patient_given, written out
	not bound
} else if {
	count(deny) == 0
}

_filter_permitted if {
	some r in rbac.granting_roles
	_roles_data[r].patient_filter == true
}

# METADATA
# title: Patient required
# description: Patient data can only be reached for one named patient
# custom:
#   code: PATIENT_REQUIRED
deny contains util.reason(rego.metadata.rule()) if {
	patient_data
	not _patient_given
}

# METADATA
# title: Patient mismatch
# description: The subject is bound to a different patient
# custom:
#   code: PATIENT_MISMATCH
deny contains util.reason(rego.metadata.rule()) if {
	bound
	_patient_given
	not _same_patient
	not _binding_waived
}

# METADATA
# title: Patient filter not permitted
# description: The subject's role may not name a patient when reading this resource type
# custom:
#   code: PATIENT_FILTER_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	not patient_data
	_patient_given
	count(rbac.granting_roles) > 0
	not _filter_permitted
}
