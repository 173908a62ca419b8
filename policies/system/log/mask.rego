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

# The patient's consent directives (which labels they restrict says something about their health).
mask contains "/input/context/consent"

mask contains path if some path in _masks("/input/resource/params", _event_input.resource.params, _kept_params)

mask contains path if some path in _masks("/input/subject/claims", _event_input.subject.claims, _kept_claims)

# _masks: the paths to erase in one object: each key not kept; the whole object as well when a key
# would need JSON-pointer escaping ("/" or "~") or is not a string. Keys are compared as one set
# (object.keys minus the kept ones) and checked for "/" and "~" by one regex over their
# concatenation, so an event costs a few steps plus two per erased key, not a rule per key. An
# array with elements is erased whole.
_masks(prefix, obj, kept) := {concat("/", [prefix, key]) | some key in erase} if {
	is_object(obj)
	erase := object.keys(obj) - kept
	not regex.match(`[/~]`, concat("", erase))
} else := {prefix} | {concat("/", [prefix, key]) | some key in erase; not _unsafe_key(key)} if {
	is_object(obj)
	erase := object.keys(obj) - kept
} else := {prefix} if {
	is_array(obj)
	count(obj) > 0
}

_unsafe_key(key) if not is_string(key)

_unsafe_key(key) if contains(key, "/")

_unsafe_key(key) if contains(key, "~")
