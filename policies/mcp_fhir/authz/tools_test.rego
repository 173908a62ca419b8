package mcp_fhir.authz.tools_test

import data.mcp_fhir.authz.testing
import data.mcp_fhir.authz.tools

_codes(i) := {r.code | some r in tools.deny with input as i}

test_catalogued_tool_matches if {
	tools.matches with input as testing.clinician_obs
	_codes(testing.clinician_obs) == set()
}

test_unknown_tool_denied if {
	_codes(testing.patched(testing.clinician_obs, {"/action/tool": "drop_tables"})) == {"UNKNOWN_TOOL"}
}

test_operation_mismatch_denied if {
	_codes(testing.patched(testing.clinician_obs, {"/action/operation": "create"})) == {"TOOL_OPERATION_MISMATCH"}
}

test_resource_type_mismatch_denied if {
	_codes(testing.patched(testing.clinician_obs, {"/action/resource_type": "Patient"})) == {"TOOL_RESOURCE_TYPE_MISMATCH"}
}

test_catalogue_has_the_sixteen_tools if {
	count(data.mcp_fhir.config.tools) == 16
}

# matches is exactly _operation_matches and _type_matches, on every input of testing.ok_inputs.
test_matches_is_operation_and_type_matching if {
	mismatches := {i |
		some i in testing.ok_inputs
		tools.matches with input as i
		not _both(i)
	} | {i |
		some i in testing.ok_inputs
		_both(i)
		not tools.matches with input as i
	}
	count(mismatches) == 0
}

_both(i) if {
	tools._operation_matches with input as i
	tools._type_matches with input as i
}
