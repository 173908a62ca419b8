# METADATA
# title: Patient consent
# description: >-
#   The patient's consent directives, normalised by the sidecar (context.consent), narrow a
#   decision: an active deny provision that applies to the subject and purpose denies the call
#   (CONSENT_DENIED) or withholds its security labels. A permit never widens beyond the role; a
#   provision outside its period has no effect; break-glass overrides only where data says so,
#   with an alert. Consent the sidecar could not read denies (CONSENT_UNAVAILABLE). Without
#   context.consent nothing here applies.
package mcp_fhir.authz.consent

import data.mcp_fhir.authz.purpose
import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.sensitivity
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.consent as _cfg

# _active: the deny provisions in force for this request: consent read, inside the period, and
# applying to the subject and the purpose.
_active contains p if {
	consent := request.consent
	consent.status == "ok"
	some p in object.get(consent, "provisions", [])
	p.type == "deny"
	_in_period(object.get(p, "period", null))
	_actor_applies(object.get(p, "actor", []), object.get(p, "actor_roles", []))
	_purpose_applies(object.get(p, "purpose", []))
}

_in_period(period) if {
	period == null
} else if {
	_after_start(object.get(period, "start", null))
	_before_end(object.get(period, "end", null))
}

_after_start(start) if {
	start == null
} else if {
	time.parse_rfc3339_ns(start) <= request.time_ns
}

_before_end(end) if {
	end == null
} else if {
	request.time_ns <= time.parse_rfc3339_ns(end)
}

# _actor_applies: a provision naming actors (references) applies when one of them is the subject
# (its id or on_behalf_of); one naming only actor roles applies when a role is an AI agent's
# (config/consent ai_actor_roles: every call through the sidecar is an AI agent's); one naming
# neither applies to everyone.
_actor_applies(actors, _) if {
	count(actors) > 0
	some actor in actors
	actor in {input.subject.id, object.get(input.subject, "on_behalf_of", null)}
}

_actor_applies(actors, roles) if {
	count(actors) == 0
	some role in roles
	role in {r | some r in _cfg.ai_actor_roles}
}

_actor_applies(actors, roles) if {
	count(actors) == 0
	count(roles) == 0
}

_purpose_applies(codes) if {
	count(codes) == 0
} else if {
	some code in codes
	code in _request_purpose_codes
}

_request_purpose_codes := util.as_set(_cfg.ai_processing_purposes) | util.as_set(codes) if {
	codes := _cfg.purpose_codes[purpose.effective]
} else := util.as_set(_cfg.ai_processing_purposes)

_class_applies(p) if {
	count(object.get(p, "classes", [])) == 0
} else if {
	request.resource_type in p.classes
}

_whole_denied if {
	some p in _active
	count(object.get(p, "security_labels", [])) == 0
	_class_applies(p)
}

_restricted_labels := {label |
	some p in _active
	_class_applies(p)
	some label in object.get(p, "security_labels", [])
}

_overridden if {
	_cfg.break_glass_overrides == true
	sensitivity.break_glass_active
}

_restricts if _whole_denied

_restricts if count(_restricted_labels) > 0

default excluded_labels := set()

# excluded_labels: labels the patient's consent withholds from this call (joined to
# exclude_security_labels).
excluded_labels := _restricted_labels if {
	request.consent # first: without consent, one step
	not _overridden
}

# alerts: consent_override when break-glass lifted a consent restriction.
alerts contains "consent_override" if {
	request.consent
	_overridden
	_restricts
}

default ok := false

# ok: no consent deny reason (count(deny) == 0; consent_test.rego pins the two together). Both deny
# rules need context.consent, so without it they are not evaluated.
ok if {
	not request.consent
} else if {
	count(deny) == 0
}

# METADATA
# title: Consent unavailable
# description: The patient's consent could not be read, so the call is denied
# custom:
#   code: CONSENT_UNAVAILABLE
deny contains util.reason(rego.metadata.rule()) if request.consent.status != "ok"

# METADATA
# title: Consent denied
# description: A consent directive of the patient denies this access
# custom:
#   code: CONSENT_DENIED
deny contains util.reason(rego.metadata.rule()) if {
	request.consent
	_whole_denied
	not _overridden
}
