"""Agent authentication: who is calling, as a ``Subject`` for OPA.

HTTP: ``AgentTokenVerifier`` (bearer JWT from the configured issuer, or an ``mfk_`` API key)
plugged into the SDK, plus ``protect_http_app`` around the streamable HTTP app.
stdio: ``local_subject(settings)``.
"""

from mcp_fhir.agent_auth.api_keys import ApiKeyStore, generate_api_key, hash_api_key
from mcp_fhir.agent_auth.errors import REASONS, AgentAuthError, AuthFailureReason
from mcp_fhir.agent_auth.http import (
    RejectTokenInQuery,
    ReportAuthRejections,
    protect_http_app,
    transport_security_for,
)
from mcp_fhir.agent_auth.jwks import JwksCache
from mcp_fhir.agent_auth.jwt import JwtVerifier
from mcp_fhir.agent_auth.local import local_subject
from mcp_fhir.agent_auth.settings import AgentAuthSettings, ApiKeyEntry, JwksSettings, LocalIdentity
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.agent_auth.verifier import (
    AgentTokenVerifier,
    OnReject,
    auth_settings_for,
    build_token_verifier,
    subject_from_access_token,
)

__all__ = [
    "REASONS",
    "AgentAuthError",
    "AgentAuthSettings",
    "AgentTokenVerifier",
    "ApiKeyEntry",
    "ApiKeyStore",
    "AuthFailureReason",
    "JwksCache",
    "JwksSettings",
    "JwtVerifier",
    "LocalIdentity",
    "OnReject",
    "RejectTokenInQuery",
    "ReportAuthRejections",
    "Subject",
    "auth_settings_for",
    "build_token_verifier",
    "generate_api_key",
    "hash_api_key",
    "local_subject",
    "protect_http_app",
    "subject_from_access_token",
    "transport_security_for",
]
