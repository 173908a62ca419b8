# METADATA
# title: Shared helpers
# description: Small pure functions used by every policy package. No rule here reads input.
package mcp_fhir.authz.util

# reason builds a deny reason from the metadata of the rule that calls it:
# custom.code is the stable code, description the human message.
reason(meta) := {"code": meta.custom.code, "message": meta.description}

# reason_with_detail appends a non-PHI detail (field or tool names) to the message.
reason_with_detail(meta, detail) := {
	"code": meta.custom.code,
	"message": sprintf("%s (%s)", [meta.description, detail]),
}

# non_empty_string is true for a string holding something other than whitespace.
non_empty_string(x) if {
	is_string(x)
	trim_space(x) != ""
}

# string_array is true for an array whose elements are all strings.
string_array(x) if {
	is_array(x)
	every element in x {
		is_string(element)
	}
}

# null_or_string is true for null or any string. One rule with else: a function with several
# independent definitions evaluates every one of them on each call (to detect conflicts).
null_or_string(x) if {
	x == null
} else if {
	is_string(x)
}

# as_set turns an array (or set) of values into a set; anything else gives the empty set.
as_set(x) := {v | some v in x} if {
	is_array(x)
} else := x if {
	is_set(x)
} else := set()
