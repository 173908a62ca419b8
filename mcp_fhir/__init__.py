"""mcp-fhir: an authorization sidecar between AI agents (MCP) and EHR FHIR APIs.

Every call is authenticated, decided by Open Policy Agent, fetched with least privilege,
filtered by the decision's obligations, and audited before any data leaves.
"""

from mcp_fhir._exceptions import (
    AuditUnavailable,
    AuthenticationError,
    CircuitOpen,
    ConfigError,
    IdMapUnavailable,
    InvalidArgument,
    MCPFhirError,
    PolicyDenied,
    PolicyError,
    PolicyMalformed,
    PolicyTimeout,
    PolicyUnavailable,
    PolicyUndefined,
    ResourceNotFound,
    ToolUnavailable,
    UnknownPatient,
    UpstreamAuthError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcp_fhir._version import __version__
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.fake import FakeAuditTrail
from mcp_fhir.config import Settings, load
from mcp_fhir.ehr.client import EHRClient, FakeEHRClient, FetchResult, FhirEHRClient
from mcp_fhir.policy.decide import Decider
from mcp_fhir.policy.engine import Decision, FakePolicyEngine, Obligations, PolicyEngine
from mcp_fhir.policy.input import DecisionInput
from mcp_fhir.policy.opa import OpaPolicyEngine, OpaSettings
from mcp_fhir.server import build_server
from mcp_fhir.tools import CallPath, Tool, all_tools

__all__ = [
    "AuditUnavailable",
    "AuthenticationError",
    "CallPath",
    "CircuitOpen",
    "ConfigError",
    "Decider",
    "Decision",
    "DecisionInput",
    "EHRClient",
    "FakeAuditTrail",
    "FakeEHRClient",
    "FakePolicyEngine",
    "FetchResult",
    "FhirEHRClient",
    "IdMapUnavailable",
    "InvalidArgument",
    "MCPFhirError",
    "Obligations",
    "OpaPolicyEngine",
    "OpaSettings",
    "PolicyDenied",
    "PolicyEngine",
    "PolicyError",
    "PolicyMalformed",
    "PolicyTimeout",
    "PolicyUnavailable",
    "PolicyUndefined",
    "ResourceNotFound",
    "Settings",
    "Subject",
    "Tool",
    "ToolUnavailable",
    "UnknownPatient",
    "UpstreamAuthError",
    "UpstreamBadResponse",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamRejected",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "__version__",
    "all_tools",
    "build_server",
    "load",
]
