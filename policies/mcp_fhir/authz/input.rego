# METADATA
# title: Decision input validation and normalisation
# description: >-
#   Checks the shape of the decision input against the contract and exposes normalised
#   values. Every other package reads the request through this one, and only after
#   well_formed holds, so no builtin ever sees a value of the wrong type.
package mcp_fhir.authz.request

import data.mcp_fhir.authz.util

_subject := input.subject if is_object(input.subject)

_action := input.action if is_object(input.action)

_resource := input.resource if is_object(input.resource)

_context := input.context if is_object(input.context)

# Each check is a positive rule; the malformed sets negate the rule itself, never a builtin
# call, because a builtin given an undefined argument makes a negated expression fail.
_subject_ok if is_object(_subject)

_subject_id_ok if util.non_empty_string(_subject.id)

_subject_authn_ok if _subject.authn in {"oauth", "api_key", "local"}

_subject_claims_ok if is_object(_subject.claims)

_subject_scopes_ok if util.string_array(_subject.scopes)

_subject_on_behalf_of_ok if util.null_or_string(object.get(_subject, "on_behalf_of", null))

_input_ok if is_object(input)

_action_ok if is_object(_action)

_action_tool_ok if util.non_empty_string(_action.tool)

_action_operation_ok if _action.operation in {"read", "search", "create", "update"}

_action_resource_type_ok if util.non_empty_string(_action.resource_type)

_resource_ok if is_object(_resource)

_resource_patient_ok if _patient_ok(object.get(_resource, "patient", null))

_resource_params_ok if is_object(object.get(_resource, "params", {}))

_context_ok if is_object(_context)

_context_time_ok if valid_time(_context.time)

_context_purpose_ok if util.null_or_string(object.get(_context, "purpose", null))

_context_break_glass_ok if _break_glass_ok(object.get(_context, "break_glass", null))

_context_field_ok(key) if util.null_or_string(object.get(_context, key, null))

# malformed_subject names each subject field that breaks the contract.
malformed_subject contains "subject" if not _subject_ok

malformed_subject contains "subject.id" if not _subject_id_ok

malformed_subject contains "subject.authn" if not _subject_authn_ok

malformed_subject contains "subject.claims" if not _subject_claims_ok

malformed_subject contains "subject.scopes" if not _subject_scopes_ok

malformed_subject contains "subject.on_behalf_of" if {
	_subject_ok
	not _subject_on_behalf_of_ok
}

# malformed names every field (subject, action, resource, context) that breaks the contract.
malformed contains "input" if not _input_ok

malformed contains field if some field in malformed_subject

malformed contains "action" if not _action_ok

malformed contains "action.tool" if not _action_tool_ok

malformed contains "action.operation" if not _action_operation_ok

malformed contains "action.resource_type" if not _action_resource_type_ok

malformed contains "resource" if not _resource_ok

malformed contains "resource.patient" if {
	_resource_ok
	not _resource_patient_ok
}

malformed contains "resource.params" if {
	_resource_ok
	not _resource_params_ok
}

malformed contains "context" if not _context_ok

malformed contains "context.time" if not _context_time_ok

malformed contains "context.purpose" if {
	_context_ok
	not _context_purpose_ok
}

malformed contains "context.break_glass" if {
	_context_ok
	not _context_break_glass_ok
}

malformed contains "context.consent" if {
	_context_ok
	not _consent_ok(object.get(_context, "consent", null))
}

# context.consent: null, or {status: ok|unavailable, provisions?: [{type: permit|deny, actor?,
# actor_roles?, purpose?, security_labels?, classes? (string arrays), period?: null|{start?, end?} (RFC 3339 or
# null)}]}.
_consent_ok(c) if {
	c == null
} else if {
	is_object(c)
	c.status in {"ok", "unavailable"}
	provisions := object.get(c, "provisions", [])
	is_array(provisions)
	every p in provisions {
		_provision_ok(p)
	}
}

_provision_ok(p) if {
	is_object(p)
	p.type in {"permit", "deny"}
	every key in ["actor", "actor_roles", "purpose", "security_labels", "classes"] {
		util.string_array(object.get(p, key, []))
	}
	_period_ok(object.get(p, "period", null))
}

_period_ok(period) if {
	period == null
} else if {
	is_object(period)
	every key in ["start", "end"] {
		_time_or_null(object.get(period, key, null))
	}
}

_time_or_null(t) if {
	t == null
} else if {
	valid_time(t)
}

malformed contains "context.activity" if {
	_context_ok
	not _activity_ok(object.get(_context, "activity", null))
}

# context.activity: null, or window seconds ("60") -> {calls, denials, distinct_patients}, each a
# whole number written without exponent (as the contract regex reads it).
_activity_ok(a) if {
	a == null
} else if {
	is_object(a)
	every window, counters in a {
		regex.match(`^[0-9]+$`, window)
		is_object(counters)
		object.keys(counters) == {"calls", "denials", "distinct_patients"}
		every n in counters {
			regex.match(`^[0-9]+$`, json.marshal(n))
		}
	}
}

malformed contains field if {
	_context_ok
	some key in ["backend", "request_id"]
	not _context_field_ok(key)
	field := concat(".", ["context", key])
}

# One definition with else (a function with several definitions evaluates all of them).
_patient_ok(p) if {
	p == null
} else if {
	is_string(p)
	trim_space(p) != ""
}

_break_glass_ok(bg) if {
	bg == null
} else if {
	is_object(bg)
	util.null_or_string(object.get(bg, "reason", null))
}

# valid_time is true for an RFC 3339 date-time that time.parse_rfc3339_ns accepts, checked by one
# regex: years 1678-2261 (epoch nanoseconds fit int64 only from 1677-09-21 to 2262-04-11; whole
# years inside that), each month's days, and February 29 only in the leap years of that range
# (every fourth year except 1700, 1800, 1900, 2100 and 2200; 2000 is one). The pattern is written
# inline: a rule holding it would cost a step per query, a leap-year test three more.
valid_time(t) if {
	is_string(t)
	regex.match(`^((167[89]|16[89][0-9]|1[7-9][0-9]{2}|2[01][0-9]{2}|22[0-5][0-9]|226[01])-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))|(16(8[048]|9[26])|(1[7-9]|2[01])(0[48]|[2468][048]|[13579][26])|2000|22(0[48]|[24][048]|60|[135][26]))-02-29)T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$`, t)
}

default well_formed := false

# well_formed holds when the whole input matches the contract: exactly when malformed is empty
# (input_test.rego pins the two together on a table of inputs; edit both when a check changes).
# The same checks as malformed, written out in one body with cheap builtins (type_name, trim_space,
# object.get), so a well-formed request (the common case) never builds the malformed set. Each field
# is read once into a local; a missing or non-object section makes its first read undefined.
well_formed if {
	subject_well_formed
	a := input.action
	a.operation in {"read", "search", "create", "update"}
	t := a.tool
	is_string(t)
	trim_space(t) != ""
	rt := a.resource_type
	is_string(rt)
	trim_space(rt) != ""
	r := input.resource
	is_object(r)
	_patient_ok(object.get(r, "patient", null))
	is_object(object.get(r, "params", {}))
	c := input.context
	valid_time(c.time)
	type_name(object.get(c, "purpose", null)) in {"null", "string"}
	type_name(object.get(c, "backend", null)) in {"null", "string"}
	type_name(object.get(c, "request_id", null)) in {"null", "string"}
	_context_extras_ok(c)
}

# _context_extras_ok: break_glass, consent and activity each null/absent or matching the contract.
# The common case (all three null or absent) is one filter and one subset test; else each is
# checked. Constants are written inline (a rule holding them would cost a step per query).
_context_extras_ok(c) if {
	object.subset({"break_glass": null, "consent": null, "activity": null}, object.filter(c, ["break_glass", "consent", "activity"]))
} else if {
	_break_glass_ok(object.get(c, "break_glass", null))
	_consent_ok(object.get(c, "consent", null))
	_activity_ok(object.get(c, "activity", null))
}

default subject_well_formed := false

# subject_well_formed holds when input.subject alone matches the contract (visible_tools): exactly
# when malformed_subject is empty and the input is an object.
subject_well_formed if _subject_fields_ok(input.subject)

# _subject_fields_ok: the subject's checks (malformed_subject), one body. A non-object subject has
# no id, so the first expression fails.
_subject_fields_ok(s) if {
	id := s.id
	is_string(id)
	trim_space(id) != ""
	s.authn in {"oauth", "api_key", "local"}
	is_object(s.claims)
	scopes := s.scopes
	is_array(scopes)
	every scope in scopes {
		is_string(scope)
	}
	type_name(object.get(s, "on_behalf_of", null)) in {"null", "string"}
}

# METADATA
# title: Input malformed
# description: The decision input does not match the contract
# custom:
#   code: INPUT_MALFORMED
deny contains util.reason_with_detail(rego.metadata.rule(), concat(", ", sort(malformed))) if count(malformed) > 0

# Normalised request values; meaningful only when well_formed holds.
# Each is defined only when the (subject part of the) input is well formed, so downstream
# builtins are safe; the guard is the cached well_formed/subject_well_formed rule, not the
# per-field checks again.
claims := input.subject.claims if subject_well_formed

scopes := input.subject.scopes if subject_well_formed

tool := input.action.tool if well_formed

operation := input.action.operation if well_formed

resource_type := input.action.resource_type if well_formed

default patient := null

# well_formed admits only null, absent or a non-empty string here.
patient := p if {
	well_formed
	p := input.resource.patient
	p != null
}

default params := {}

params := p if {
	p := input.resource.params
	is_object(p)
}

default declared_purpose := null

declared_purpose := p if {
	p := input.context.purpose
	is_string(p)
	trim_space(p) != ""
}

default context_given := false

context_given if is_object(input.context)

time_ns := time.parse_rfc3339_ns(input.context.time) if well_formed

# consent: the patient's normalised consent directives, when the sidecar sends them.
consent := c if {
	well_formed
	c := input.context.consent
	c != null
}

# activity: the per-subject counters by window (seconds as text), when the sidecar sends them.
activity := a if {
	well_formed
	a := input.context.activity
	a != null
}

default break_glass_requested := false

# break_glass_requested: the caller sent a break_glass object (with or without a reason).
break_glass_requested if is_object(input.context.break_glass)

default break_glass_reason_given := false

break_glass_reason_given if util.non_empty_string(input.context.break_glass.reason)
