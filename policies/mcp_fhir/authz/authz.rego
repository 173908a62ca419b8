# METADATA
# title: mcp-fhir authorization
# description: >-
#   Entry points for the mcp-fhir sidecar. decision answers one tool call (always an object
#   with allow, reasons, obligations and audit); visible_tools lists the tools a subject could
#   ever call. Every deny carries at least one reason with a stable code.
package mcp_fhir.authz

import data.mcp_fhir.authz.anomalies
import data.mcp_fhir.authz.consent
import data.mcp_fhir.authz.patient
import data.mcp_fhir.authz.purpose
import data.mcp_fhir.authz.rbac
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.scopes
import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.authz.tools
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.tools as _catalogue
import data.mcp_fhir.derived as _derived

# METADATA
# title: Decision
# description: >-
#   The decision for one tool call; POST /v1/data/mcp_fhir/authz/decision. One object per
#   outcome, so nothing below re-tests allow: an allowed call gets the granted obligations, a
#   denied one its reasons and the closed obligations.
# entrypoint: true
decision := {
	"allow": true,
	"reasons": [],
	"obligations": _granted_obligations,
	"audit": {"sensitivity": _granted_sensitivity, "alerts": sort(_granted_alerts)},
	"valid_for_s": anomalies.valid_for_s,
} if {
	allow
} else := {
	"allow": false,
	"reasons": sort(_denied_reasons),
	"obligations": _closed_obligations,
	"audit": {"sensitivity": "standard", "alerts": sort(_request_alerts)},
	"valid_for_s": anomalies.valid_for_s,
}

default allow := false

# allow needs a well-formed request, every positive grant present, and no deny reason (each
# remaining package's ok: its deny set is empty, tested cheaply for the common case). The
# tools, rbac, purpose and scopes deny rules each fire only when one of these grants is missing
# (tools.matches implies a known tool; a grant for the request's access, type and effective purpose
# implies a known role, a permitting and granting role, an effective, unambiguous and known purpose
# that covers the access and type), so on the allow
# path only the deny sets not implied by the grants are evaluated. authz_test.rego pins this
# against the full definition (well formed, no reason in _deny, every grant).
allow if {
	request.well_formed
	tools.matches
	count(rbac.granting_roles) > 0 # with purpose.permitted: rbac.grants holds [access, type, effective]
	purpose.permitted
	scopes.covered
	patient.ok
	sensitivity.ok
	consent.ok
	count(deny) == 0 # this package's deny set is open to new rules (README: add a deny rule)
}

_deny := request.deny if not request.well_formed

_deny := ((((((_tools_deny | _rbac_deny) | _purpose_deny) | _patient_deny) | scopes.deny) | _sensitivity_deny) | _consent_deny) | deny if {
	request.well_formed
}

# Each package's deny set, read only when a positive fact that rules out all of its reasons (often
# already known from allow) fails: the tool matches the catalogue; some role grants the request;
# the purpose permits it; the package's ok. This package's own deny set is always read (new deny
# rules are added here). authz_test.rego pins _deny to the union of the deny sets.
_tools_deny := set() if tools.matches

else := tools.deny

_rbac_deny := set() if count(rbac.granting_roles) > 0

else := rbac.deny

_purpose_deny := set() if purpose.permitted

else := purpose.deny

_patient_deny := set() if patient.ok

else := patient.deny

_sensitivity_deny := set() if sensitivity.ok

else := sensitivity.deny

_consent_deny := set() if consent.ok

else := consent.deny

# METADATA
# title: Category not permitted
# description: Purpose and scopes together leave no category of this resource type, or exclude the requested one
# custom:
#   code: CATEGORY_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	count(allowed_categories[request.resource_type]) == 0
}

# METADATA
# title: Requested category not permitted
# description: The requested category is not among the categories allowed for this resource type
# custom:
#   code: CATEGORY_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	is_string(request.params.category)
	cats := allowed_categories[request.resource_type]
	not _code(request.params.category) in cats
}

# METADATA
# title: Access pattern denied
# description: An access-pattern threshold in policy data denies this call
# custom:
#   code: ACCESS_PATTERN_DENIED
deny contains util.reason_with_detail(rego.metadata.rule(), concat(", ", sort(anomalies.denied_patterns))) if {
	count(anomalies.denied_patterns) > 0
}

_code(token) := code if {
	parts := split(token, "|")
	code := parts[count(parts) - 1]
}

# METADATA
# title: Policy incomplete
# description: The policy found no deny reason but no grant either; denied by default
# custom:
#   code: POLICY_INCOMPLETE
_incomplete := util.reason(rego.metadata.rule())

# reasons on deny: every deny reason, or POLICY_INCOMPLETE when none applies.
_denied_reasons := _deny if count(_deny) > 0

else := {_incomplete}

# allowed_categories: resource type -> categories, where purpose or scopes restrict them
# (the intersection when both do). A type absent from the map is unrestricted.
allowed_categories := {request.resource_type: cats} if {
	cats := _purpose_categories & scopes.request_categories
} else := {request.resource_type: cats} if {
	cats := _purpose_categories
} else := {request.resource_type: cats} if {
	cats := scopes.request_categories
} else := {}

# The purpose's categories for this type, computed once (undefined when unrestricted).
_purpose_categories := util.as_set(purpose.definition.resource_types[request.resource_type].categories)

_closed_obligations := {
	"exclude_security_labels": sensitivity.sorted_labels,
	"allowed_categories": {},
	"redact": [],
	"max_lookback_days": 0,
	"max_results": 0,
}

_base_obligations := {
	"exclude_security_labels": sort(sensitivity.excluded),
	"allowed_categories": {rt: sort(cats) | some rt, cats in allowed_categories},
	"redact": sort(rbac.role_redact | purpose.redact),
	"max_lookback_days": purpose.max_lookback_days,
	"max_results": purpose.max_results,
}

# The obligations of an allow: the base ones; an audit-log tool's also carry audit_patients
# (config/audit_log); a tool whose data names `confirm` also carries it (a person confirms the write
# through MCP elicitation before it is made). No other tool's obligations change.
_granted_obligations := _base_obligations if {
	tool := request.tool # the common case: neither an audit-log tool nor one with confirm
	not tool in data.mcp_fhir.config.audit_log.tools
	not data.mcp_fhir.config.tools[tool].confirm # absent (or false): no confirm obligation
} else := object.union(object.union(_base_obligations, _audit_obligations), _confirm_obligations)

_audit_obligations := {"audit_patients": patient.audit_patients} if {
	request.tool in data.mcp_fhir.config.audit_log.tools
} else := {}

_confirm_obligations := {"confirm": c} if {
	c := data.mcp_fhir.config.tools[request.tool].confirm
	is_object(c)
} else := {}

# The decision's audit.sensitivity on allow: restricted when break-glass was used, sensitive when
# some default-withheld label is let through, else standard (a denied call is always standard).
_granted_sensitivity := "restricted" if {
	sensitivity.break_glass_active
} else := "sensitive" if {
	count(sensitivity.let_through) > 0
} else := "standard"

# Alerts for any well-formed request (after hours, break-glass); none for a malformed one.
_request_alerts := anomalies.alerts if request.well_formed

else := set()

# Alerts on allow: the request's, plus sensitive_access_non_clinician when labels reach a
# subject with no clinical granting role.
_granted_alerts := anomalies.alerts | {"sensitive_access_non_clinician"} if {
	sensitivity.non_clinician_release
} else := anomalies.alerts

# METADATA
# title: Visible tools
# description: >-
#   Sorted names of the tools the subject could ever call: a role permits the tool's operation
#   on one of its resource types under some purpose (the given one, if any) and the scopes
#   cover it. POST /v1/data/mcp_fhir/authz/visible_tools with {"subject": ...}.
# entrypoint: true
default visible_tools := []

visible_tools := sort(typed | wild) if {
	request.subject_well_formed
	entries := _subject_entries
	pairs := _scope_pairs
	typed := {name |
		some [rt, letter, names] in entries # a local, not a rule reference: one step per entry
		[rt, letter] in pairs
		some name in names
	}
	wild := _wildcard_tools(entries, pairs)
}

# _wildcard_tools: the tools of entries whose letter a scope grants on every type ("*"); nothing is
# iterated when no scope has a "*" type (the common case).
_wildcard_tools(entries, pairs) := {name |
	some [_, letter, names] in entries
	["*", letter] in pairs
	some name in names
} if {
	some ["*", _] in pairs
} else := set()

# _subject_entries: [resource type, scope letter, tool names] for each [operation, type] pair of
# _subject_grants that some tool has: from the derived visible table (role -> purpose -> entries)
# while it is fresh, else computed here.
_subject_entries := {e |
	some r in rbac.roles
	some e in table[r][effective]
} if {
	_visible_fresh
	effective := purpose.effective
	table := _derived.visible
} else := {e |
	some r in rbac.roles
	some entries in table[r]
	some e in entries
} if {
	_visible_fresh
	not purpose.effective
	table := _derived.visible
} else := {[rt, letters[operation], names] |
	some [operation, rt] in grants
	names := by_operation[operation][rt]
} if {
	grants := _subject_grants
	letters := data.mcp_fhir.config.defaults.scope_letter
	by_operation := _tools_by_operation
}

# The visible table was derived from the live roles, purposes, defaults and tools (not stale, not
# replaced in a test).
_visible_fresh if {
	_derived.source.roles == data.mcp_fhir.config.roles
	_derived.source.purposes == data.mcp_fhir.config.purposes
	_derived.source.defaults == data.mcp_fhir.config.defaults
	_derived.source.tools == _catalogue
}

# _subject_grants: the [operation, resource type] pairs of the subject's grants (rbac.grants, the
# same relation decision asks) under a purpose it may use here (only the given/bound one, when there
# is one). Computed once per query from the subject's [access, type] pairs, so each pair costs a
# few steps and each tool with that operation and type one more.
_subject_grants := {[operation, rt] |
	some [acc, rt] in _subject_access
	some operation in _operations[acc]
}

_subject_access := {[acc, rt] | some [acc, rt, p] in rbac.grants; p == effective} if {
	effective := purpose.effective
} else := {[acc, rt] | some [acc, rt, _] in rbac.grants}

# The catalogue by operation and resource type, and the operations of each access kind: from the
# derived tables while they are fresh, else computed from the YAML.
_tools_by_operation := _derived.tools if {
	_derived.source.tools == _catalogue
} else := {op: {rt: names |
	some t in _catalogue
	t.operation == op
	some rt in t.resource_types
	names := [name | some name, u in _catalogue; u.operation == op; rt in u.resource_types]
} |
	some t in _catalogue
	op := t.operation
}

_operations := _derived.operations if {
	_derived.source.defaults == data.mcp_fhir.config.defaults
} else := {acc: [op | some op, a in data.mcp_fhir.config.defaults.access; a == acc] |
	some acc in data.mcp_fhir.config.defaults.access
}

# _scope_pairs: the [type, letter] pairs the subject's honoured scopes grant ("*" type kept),
# parsed once. visible_tools lists a tool for any scope context (a patient/ scope covers the
# call that names a patient).
_scope_pairs := {[t, letter] |
	some s in scopes.subject_scopes
	t := s.type
	some letter in s.letters
}
