# METADATA
# title: Purpose of use
# description: >-
#   The effective purpose is the declared context.purpose, else the purpose bound by the
#   credential. A declared purpose never overrides a bound one. Each purpose lists the
#   access kinds, resource types and categories it may touch.
package mcp_fhir.authz.purpose

import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.claims.purpose as _claim_name
import data.mcp_fhir.config.defaults as _defaults
import data.mcp_fhir.config.purposes as _purposes

# The credential binds a purpose when it carries the claim at all (any value but null).
_bound if object.get(request.claims, _claim_name, null) != null

_bound_purpose := request.claims[_claim_name] if util.non_empty_string(request.claims[_claim_name])

_declared if request.declared_purpose != null

# _mismatch: a bound claim that is not a usable purpose, or a declared purpose that differs from it.
_mismatch if {
	_bound
	not _bound_purpose
} else if {
	_bound
	_declared
	_bound_purpose != request.declared_purpose
}

# effective is the purpose this request acts under; undefined when missing or contradictory.
# One else chain: the declared purpose, else (nothing declared) the bound one.
effective := p if {
	p := request.declared_purpose # _declared, written out: the value is needed anyway
	p != null
	not _mismatch
} else := p if {
	p := _bound_purpose # first: without a bound purpose (the common case) _mismatch is not evaluated
	not _mismatch
}

_known if _purposes[effective]

# definition is the data entry of the effective purpose.
definition := _purposes[effective]

access := _defaults.access[request.operation]

default permitted := false

# permitted holds when the effective purpose covers this access kind and resource type.
permitted if {
	def := definition
	access in def.access
	def.resource_types[request.resource_type]
}

default max_lookback_days := 36500

# max_lookback_days is the purpose's lookback, or the "unbounded" sentinel from defaults.
max_lookback_days := object.get(definition, "max_lookback_days", _defaults.unbounded_lookback_days)

default max_results := 0

# max_results is the smaller of the default cap and the purpose's own cap.
max_results := min({cap, object.get(def, "max_results", cap)}) if {
	def := definition
	cap := _defaults.max_results
}

default redact := set()

redact := util.as_set(definition.redact)

# METADATA
# title: Purpose required
# description: No purpose of use was declared and the credential binds none
# custom:
#   code: PURPOSE_REQUIRED
deny contains util.reason(rego.metadata.rule()) if {
	not _declared
	not _bound
}

# METADATA
# title: Purpose mismatch
# description: The declared purpose differs from the purpose bound by the credential
# custom:
#   code: PURPOSE_MISMATCH
deny contains util.reason(rego.metadata.rule()) if _mismatch

# METADATA
# title: Unknown purpose
# description: The purpose of use is not defined in policy data
# custom:
#   code: PURPOSE_UNKNOWN
deny contains util.reason(rego.metadata.rule()) if {
	effective
	not _known
}

# METADATA
# title: Purpose does not cover the action
# description: The purpose of use does not permit this operation on this resource type
# custom:
#   code: PURPOSE_NOT_PERMITTED
deny contains util.reason(rego.metadata.rule()) if {
	_known
	not permitted
}
