# METADATA
# title: Patient consent
# description: >-
#   A patient's consent directives, as input.context.consent ({status, provisions}; see
#   mcp_fhir/consent.py for the normalised provision). Only deny provisions act, so a permit
#   never widens what the role grants. A deny provision binds the call when it is in effect
#   (its period has started and not ended), names the agent (no actor, an actor role in
#   data.agent_actor_roles, or the reference the agent acts for), covers the action and the
#   purpose. A binding provision with security labels withholds those labels (even where a
#   role releases them); any other binding provision denies the call (for its resource types
#   when it names classes or data, else for every type). Consent that could not be read denies.
#   Break-glass sets all of this aside only when data.break_glass_overrides is true. With no
#   input.context.consent nothing here fires.
package mcp_fhir.authz.consent

import data.mcp_fhir.authz.purpose
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.config.consent as _cfg

# _directives: the consent block when the sidecar passed one (undefined otherwise).
_directives := input.context.consent if request.well_formed

default _present := false

_present if _directives != null

# _ok: the block says the consent was read and holds a list of provisions.
_ok if {
	_directives.status == "ok"
	is_array(_directives.provisions)
}

default unavailable := false

# unavailable: a consent block is present but was not read (or is malformed): fail closed.
unavailable if {
	_present
	not _ok
}

_now := request.time_ns

# A period bound is an RFC 3339 dateTime or a FHIR date (a whole UTC day). A bound that does
# not parse keeps the provision in effect (fail closed).
_start_ns(s) := time.parse_rfc3339_ns(s) if contains(s, "T")

else := time.parse_ns("2006-01-02", s)

_end_ns(s) := time.parse_rfc3339_ns(s) if contains(s, "T")

else := (time.parse_ns("2006-01-02", s) + 86400000000000) - 1

_not_yet(p) if _start_ns(p.period.start) > _now

_ended(p) if _end_ns(p.period.end) < _now

_in_effect(p) if {
	not _not_yet(p)
	not _ended(p)
}

_binds_agent(p) if count(object.get(p, "actor", [])) == 0

_binds_agent(p) if {
	some a in p.actor
	a.role in _cfg.agent_actor_roles
}

_binds_agent(p) if {
	some a in p.actor
	is_string(a.reference)
	a.reference == input.subject.on_behalf_of
}

_covers_action(p) if count(object.get(p, "action", [])) == 0

_covers_action(p) if {
	some a in p.action
	a in _cfg.actions
}

_covers_purpose(p) if count(object.get(p, "purpose", [])) == 0

_covers_purpose(p) if {
	some c in p.purpose
	c == _cfg.purpose_codes[purpose.effective]
}

# binding: the deny provisions that bind this call.
binding contains p if {
	_ok
	some p in _directives.provisions
	p.type == "deny"
	_in_effect(p)
	_binds_agent(p)
	_covers_action(p)
	_covers_purpose(p)
}

_labels(p) := {l | some l in object.get(p, "security_labels", [])}

# The resource types a provision names, by class or by the type of an instance it names.
_types(p) := {c | some c in object.get(p, "classes", [])} | {split(d, "/")[0] | some d in object.get(p, "data", [])}

_denies_call(p) if {
	count(_labels(p)) == 0
	count(_types(p)) == 0
}

_denies_call(p) if {
	count(_labels(p)) == 0
	request.resource_type in _types(p)
}

default overridden := false

# overridden: break-glass sets a consent that binds this call aside (only where data says so).
overridden if {
	_cfg.break_glass_overrides == true
	sensitivity.break_glass_active
	_applies
}

_applies if unavailable

_applies if count(binding) > 0

# excluded_labels: labels the patient restricted, withheld on top of the role's exclusions.
excluded_labels := set() if overridden

else := {l | some p in binding; some l in _labels(p)}

# METADATA
# title: Consent denied
# description: The patient's consent directive does not permit this access
# custom:
#   code: CONSENT_DENIED
deny contains {"code": "CONSENT_DENIED", "message": "The patient's consent directive does not permit this access"} if {
	some p in binding
	_denies_call(p)
	not overridden
}

# METADATA
# title: Consent unavailable
# description: The patient's consent directives could not be read; denied until they can be
# custom:
#   code: CONSENT_UNAVAILABLE
deny contains {"code": "CONSENT_UNAVAILABLE", "message": "The patient's consent directives could not be read; denied until they can be"} if {
	unavailable
	not overridden
}
