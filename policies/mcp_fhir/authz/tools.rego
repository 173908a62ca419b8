# METADATA
# title: Tool catalogue checks
# description: The called tool must be in the catalogue, with its operation and one of its resource types.
package mcp_fhir.authz.tools

import data.mcp_fhir.authz.request
import data.mcp_fhir.authz.util
import data.mcp_fhir.config.tools as _catalogue

_known if _catalogue[request.tool]

_operation_matches if _catalogue[request.tool].operation == request.operation

_type_matches if request.resource_type in _catalogue[request.tool].resource_types

default matches := false

# matches holds when tool, operation and resource type agree with the catalogue: _operation_matches
# and _type_matches written out in one body (the tool's entry read once; tools_test.rego pins the two
# together).
matches if {
	entry := _catalogue[request.tool]
	entry.operation == request.operation
	request.resource_type in entry.resource_types
}

# METADATA
# title: Unknown tool
# description: The tool is not in the policy's tool catalogue
# custom:
#   code: UNKNOWN_TOOL
deny contains util.reason(rego.metadata.rule()) if not _known

# METADATA
# title: Operation does not match the tool
# description: The action's operation is not the catalogued operation of this tool
# custom:
#   code: TOOL_OPERATION_MISMATCH
deny contains util.reason(rego.metadata.rule()) if {
	_known
	not _operation_matches
}

# METADATA
# title: Resource type does not match the tool
# description: The action's resource type is not one of this tool's catalogued resource types
# custom:
#   code: TOOL_RESOURCE_TYPE_MISMATCH
deny contains util.reason(rego.metadata.rule()) if {
	_known
	not _type_matches
}
