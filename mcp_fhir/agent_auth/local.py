"""The stdio caller: one local identity, taken from configuration (``auth.local``).

Over stdio the only party that can talk to the server is the process that spawned it,
so there is no credential to check; who that party is, and which claims and scopes it
brings to OPA, is configuration. Without an ``auth.local`` block there is no identity,
and the server must refuse to start on stdio.
"""

from __future__ import annotations

import copy

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.settings import AgentAuthSettings
from mcp_fhir.agent_auth.subject import Subject

__all__ = ["local_subject"]


def local_subject(settings: AgentAuthSettings) -> Subject:
    """The ``Subject`` (``authn="local"``) of the stdio caller; ``ConfigError`` if none is configured."""
    local = settings.local
    if local is None:
        raise ConfigError("auth.local", "is required to serve over stdio")
    return Subject(id=local.id, authn="local", claims=copy.deepcopy(local.claims), scopes=local.scopes)
