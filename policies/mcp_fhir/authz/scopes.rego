# METADATA
# title: SMART scopes
# description: >-
#   The subject's SMART scopes must cover the resource type and operation. Accepts v1
#   (patient/Observation.read, user/*.write, *.*) and v2 (patient/Observation.rs, with an
#   optional ?category= query). A v2 category query narrows allowed_categories. A scope with
#   any other query parameter grants nothing, because the sidecar could not enforce it.
package mcp_fhir.authz.scopes

import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.defaults as _defaults
import data.mcp_fhir.derived as _derived

# parse turns one scope string into {context, type, letters, categories}; categories is
# null when the scope does not restrict categories. Undefined for scopes it cannot honour.
# The match is destructured in one step (no m[i] lookup per group).
parse(scope) := {"context": ctx, "type": rtype, "letters": letters, "categories": cats} if {
	[[_, ctx, rtype, perm, query]] := regex.find_all_string_submatch_n(`^(?:(patient|user|system)/)?([A-Za-z]+|\*)\.(read|write|\*|c?r?u?d?s?)(?:\?(.+))?$`, scope, 1)
	letters := _letters(perm, query)
	count(letters) > 0
	cats := _query_categories(query)
}

# v1 permissions carry no query; v2 letters may. Each function is one else chain (a function
# with several definitions evaluates all of them on every call).
_letters(perm, query) := util.as_set(_defaults.scope_v1[perm]) if {
	query == ""
} else := {l | some l in split(perm, "")} if {
	not _defaults.scope_v1[perm]
}

_query_categories(query) := null if {
	query == ""
} else := cats if {
	params := split(query, "&")
	every param in params {
		startswith(param, "category=")
	}
	cats := {_code(value) |
		some param in params
		some value in split(trim_prefix(param, "category="), ",")
		value != ""
	}
	count(cats) > 0
}

# _code keeps the code of a "system|code" token.
_code(token) := code if {
	parts := split(token, "|")
	code := parts[count(parts) - 1]
}

# _parsed: a scope's parse, looked up in the derived table (mcp-fhir policy build: every scope
# without a query for the types the data names) while the table is fresh, else parsed here.
_parsed(raw) := s if {
	_table_fresh
	s := _derived.scopes[raw]
} else := parse(raw)

# The table was derived from the live defaults (not stale, not replaced in a test).
_table_fresh if _derived.source.defaults == _defaults

# parsed_scopes is every scope of the subject that the policy can honour.
parsed_scopes(raw) := {s | some scope in raw; s := _parsed(scope)}

# covering gives the scopes that grant letter on resource type rt. A patient/ scope only
# covers a request that names a patient (patient_given).
covering(scopes, rt, letter, patient_given) := {s |
	some s in scopes
	s.type in {rt, "*"}
	letter in s.letters
	_context_fits(s.context, patient_given)
}

_context_fits(ctx, _) if ctx != "patient"

_context_fits("patient", true)

# covers is true when some honoured scope grants letter on rt.
covers(scopes, rt, letter, patient_given) if count(covering(scopes, rt, letter, patient_given)) > 0

letter := _defaults.scope_letter[request.operation]

# subject_scopes: the subject's honoured scopes, parsed once per evaluation (visible_tools reuses it).
subject_scopes := parsed_scopes(request.scopes)

# _request_covering: the subject's scopes that grant this request, computed once: covering()
# written out over the scopes that could cover this request's resource type. A covering scope's
# text always holds the type name or "*", so only those scopes are parsed (a subject with one
# scope per type parses one or two, not all of them). Rule values are bound to locals outside the
# comprehension (a rule reference inside it costs a step per scope).
_request_covering := {s |
	some raw in request.scopes
	_may_cover(raw, rt)
	s := _parsed(raw)
	s.type in {rt, "*"}
	l in s.letters
	_context_fits(s.context, patient_given)
} if {
	rt := request.resource_type
	l := letter
	patient_given := request.patient != null
}

_may_cover(raw, rt) if {
	contains(raw, rt)
} else if {
	contains(raw, "*")
}

default covered := false

# covered holds when the subject's scopes grant this request.
covered if count(_request_covering) > 0

# request_categories: the scope-imposed categories for this request; undefined when unrestricted.
# (categories() for this request, written out: no function call per query. scopes_test.rego pins
# _request_covering and request_categories to covering() and categories().)
request_categories := {c | some s in cover; some c in s.categories} if {
	cover := _request_covering
	count(cover) > 0
	every s in cover {
		s.categories != null
	}
}

# categories gives the categories the covering scopes allow; undefined when unrestricted.
categories(scopes, rt, letter, patient_given) := cats if {
	cover := covering(scopes, rt, letter, patient_given)
	count(cover) > 0
	every s in cover {
		s.categories != null
	}
	cats := {c | some s in cover; some c in s.categories}
}

# METADATA
# title: Scope not granted
# description: The subject's SMART scopes do not cover this operation on this resource type
# custom:
#   code: SCOPE_NOT_GRANTED
deny contains util.reason(rego.metadata.rule()) if not covered
