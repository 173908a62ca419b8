# METADATA
# title: Decision-log masking
# description: >-
#   Keeps PHI and free text out of OPA's decision log. The sidecar's own hash-chained audit
#   trail is the record of truth and keeps the patient id; OPA's log is the correlated extra,
#   so here the patient id, free-text params, the break-glass reason and every claim the
#   audit does not need are erased.
package system.log

# Claims the audit needs to explain a decision; every other claim value is erased.
_kept_claims := {"roles", "purpose_of_use", "iss", "aud", "azp", "client_id", "scope", "exp", "iat", "jti"}

# Structured, non-free-text tool parameters kept for debugging; every other param is erased.
_kept_params := {
	"bypass_cache", "category", "code", "continuation", "date_from", "date_to", "limit",
	"page_size", "result", "section", "since", "text_length", "title_length", "until",
}

_event_input := input.input

mask contains "/input/resource/patient"

mask contains "/input/context/break_glass/reason"

# Keys that would need JSON-pointer escaping: erase the whole object rather than risk a miss.
mask contains "/input/resource/params" if {
	some key, _ in _event_input.resource.params
	_unsafe_key(key)
}

mask contains concat("/", ["/input/resource/params", key]) if {
	some key, _ in _event_input.resource.params
	not key in _kept_params
	not _unsafe_key(key)
}

mask contains "/input/subject/claims" if {
	some key, _ in _event_input.subject.claims
	_unsafe_key(key)
}

mask contains concat("/", ["/input/subject/claims", key]) if {
	some key, _ in _event_input.subject.claims
	not key in _kept_claims
	not _unsafe_key(key)
}

_unsafe_key(key) if not is_string(key)

_unsafe_key(key) if contains(key, "/")

_unsafe_key(key) if contains(key, "~")

# A patient's consent provisions name people and record instances: erased (the audit keeps them).
mask contains "/input/context/consent/provisions" if is_array(_event_input.context.consent.provisions)
