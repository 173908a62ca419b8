package mcp_fhir.authz.util_test

import data.mcp_fhir.authz.util

test_as_set_handles_arrays_sets_and_others if {
	util.as_set(["a", "a"]) == {"a"}
	util.as_set({"b"}) == {"b"}
	util.as_set(null) == set()
	util.as_set("x") == set()
}

test_string_helpers if {
	util.non_empty_string("x")
	not util.non_empty_string(" ")
	util.string_array(["a"])
	not util.string_array(["a", 1])
	util.null_or_string(null)
	not util.null_or_string(1)
}
