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
# Three builtins check every field at once instead of one expression per check: json.filter keeps
# only the contract's fields (a claims or params object shrinks to {} through a path no JSON key can
# match, a break_glass object to its reason), json.marshal writes them as canonical JSON (keys sorted,
# no spaces), and one regex (_contract) checks that text. So a well-formed request (the common case)
# costs four evaluation steps here and never builds the malformed set. The pattern and paths are
# written out as literals (a rule would cost steps on every query); they are _contract and
# _contract_paths below, composed from readable pieces, and input_test.rego pins them equal.
well_formed if {
	is_object(input)
	regex.match(`^\{"action":\{"operation":"(?:create|read|search|update)","resource_type":"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))(?:[^"\\]|\\.)*","tool":"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))(?:[^"\\]|\\.)*"\},"context":\{(?:"activity":(?:null|\{(?:"[0-9]+":\{"calls":[0-9]+,"denials":[0-9]+,"distinct_patients":[0-9]+\}(?:,"[0-9]+":\{"calls":[0-9]+,"denials":[0-9]+,"distinct_patients":[0-9]+\})*)?\}),)?(?:"backend":(?:null|"(?:[^"\\]|\\.)*"),)?(?:"break_glass":(?:null|\{(?:"reason":(?:null|"(?:[^"\\]|\\.)*"))?\}),)?(?:"consent":(?:null|\{\}),)?(?:"purpose":(?:null|"(?:[^"\\]|\\.)*"),)?(?:"request_id":(?:null|"(?:[^"\\]|\\.)*"),)?"time":"((167[89]|16[89][0-9]|1[7-9][0-9]{2}|2[01][0-9]{2}|22[0-5][0-9]|226[01])-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))|(16(8[048]|9[26])|(1[7-9]|2[01])(0[48]|[2468][048]|[13579][26])|2000|22(0[48]|[24][048]|60|[135][26]))-02-29)T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"\},"resource":\{(?:"params":\{\}(?:,"patient":(?:null|"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))(?:[^"\\]|\\.)*"))?|"patient":(?:null|"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))(?:[^"\\]|\\.)*"))?\},"subject":\{"authn":"(?:api_key|local|oauth)","claims":\{\},"id":"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))(?:[^"\\]|\\.)*",(?:"on_behalf_of":(?:null|"(?:[^"\\]|\\.)*"),)?"scopes":\[(?:"(?:[^"\\]|\\.)*"(?:,"(?:[^"\\]|\\.)*")*)?\]\}\}$`, json.marshal(json.filter(input, [["subject", "authn"], ["subject", "claims", 0], ["subject", "id"], ["subject", "on_behalf_of"], ["subject", "scopes"], ["action", "operation"], ["action", "resource_type"], ["action", "tool"], ["resource", "params", 0], ["resource", "patient"], ["context", "activity"], ["context", "backend"], ["context", "break_glass", "reason"], ["context", "consent", 0], ["context", "purpose"], ["context", "request_id"], ["context", "time"]])))
	_consent_ok(object.get(input.context, "consent", null)) # the regex checks only that it is null or an object
}

default subject_well_formed := false

# subject_well_formed holds when input.subject alone matches the contract (visible_tools).
subject_well_formed if {
	is_object(input)
	regex.match(`^\{"subject":\{"authn":"(?:api_key|local|oauth)","claims":\{\},"id":"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))(?:[^"\\]|\\.)*",(?:"on_behalf_of":(?:null|"(?:[^"\\]|\\.)*"),)?"scopes":\[(?:"(?:[^"\\]|\\.)*"(?:,"(?:[^"\\]|\\.)*")*)?\]\}\}$`, json.marshal(json.filter(input, [["subject", "authn"], ["subject", "claims", 0], ["subject", "id"], ["subject", "on_behalf_of"], ["subject", "scopes"]])))
}

# The contract's fields as json.filter paths. The number 0 matches no key of a JSON object, so a
# claims or params object becomes {} (anything else stays what it is, and fails the pattern).
_subject_paths := [
	["subject", "authn"], ["subject", "claims", 0], ["subject", "id"],
	["subject", "on_behalf_of"], ["subject", "scopes"],
]

_contract_paths := array.concat(_subject_paths, [
	["action", "operation"], ["action", "resource_type"], ["action", "tool"],
	["resource", "params", 0], ["resource", "patient"],
	["context", "activity"], ["context", "backend"], ["context", "break_glass", "reason"],
	["context", "consent", 0], ["context", "purpose"],
	["context", "request_id"], ["context", "time"],
])

# The canonical JSON of a well-formed filtered input, keys in sorted order (optional keys may be
# absent). Pieces, as JSON text written by json.marshal (it escapes ", \, control characters as \t
# \n \r \f \b or \u00XX, <>& and U+2028/9 as \uXXXX, and writes every other character raw):
#   string   "(?:[^"\\]|\\.)*"
#   nonblank a string holding a character that trim_space keeps: any number of white-space units
#            (space, \p{Z}, U+0085, \t \n \r \f, \u000b \u000c \u2028 \u2029), then one that is not.
#   time     RFC 3339 within the years 1678-2261 (see valid_time; no character needs escaping).
_string := `"(?:[^"\\]|\\.)*"`

_nonblank := concat("", [
	`"(?:[ \p{Z}\x{85}]|\\[tnrf]|\\u000[bc]|\\u202[89])*`,
	`(?:[^"\\ \p{Z}\x{85}]|\\["\\/b]|\\u(?:[13-9a-f][0-9a-f]{3}|0(?:[1-9a-f][0-9a-f]{2}|0(?:[1-9a-f][0-9a-f]|0[0-9ad-f]))|2(?:[1-9a-f][0-9a-f]{2}|0(?:[013-9a-f][0-9a-f]|2[0-7a-f]))))`,
	`(?:[^"\\]|\\.)*"`,
])

_null_or_string := concat("", ["(?:null|", _string, ")"])

_subject_object := concat("", [
	`\{"authn":"(?:api_key|local|oauth)","claims":\{\},"id":`, _nonblank,
	`,(?:"on_behalf_of":`, _null_or_string, `,)?"scopes":\[(?:`, _string, `(?:,`, _string, `)*)?\]\}`,
])

_subject_contract := concat("", [`^\{"subject":`, _subject_object, `\}$`])

_contract := concat("", [
	`^\{"action":\{"operation":"(?:create|read|search|update)","resource_type":`, _nonblank,
	`,"tool":`, _nonblank, `\},"context":\{`,
	`(?:"activity":(?:null|\{(?:`, _activity_window, `(?:,`, _activity_window, `)*)?\}),)?`,
	`(?:"backend":`, _null_or_string, `,)?`,
	`(?:"break_glass":(?:null|\{(?:"reason":`, _null_or_string, `)?\}),)?`,
	`(?:"consent":(?:null|\{\}),)?`,
	`(?:"purpose":`, _null_or_string, `,)?`,
	`(?:"request_id":`, _null_or_string, `,)?`,
	`"time":"`, _time_pattern, `"\},"resource":\{`,
	`(?:"params":\{\}(?:,"patient":(?:null|`, _nonblank, `))?|"patient":(?:null|`, _nonblank, `))?`,
	`\},"subject":`, _subject_object, `\}$`,
])

# One window of context.activity: its length in seconds -> the three counters, whole numbers.
_activity_window := `"[0-9]+":\{"calls":[0-9]+,"denials":[0-9]+,"distinct_patients":[0-9]+\}`

_time_pattern := `((167[89]|16[89][0-9]|1[7-9][0-9]{2}|2[01][0-9]{2}|22[0-5][0-9]|226[01])-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))|(16(8[048]|9[26])|(1[7-9]|2[01])(0[48]|[2468][048]|[13579][26])|2000|22(0[48]|[24][048]|60|[135][26]))-02-29)T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])`

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
