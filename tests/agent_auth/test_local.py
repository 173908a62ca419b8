"""The stdio caller's identity comes from configuration."""

from __future__ import annotations

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.local import local_subject
from mcp_fhir.agent_auth.settings import AgentAuthSettings, LocalIdentity


def test_local_subject_is_built_from_config_with_authn_local():
    claims = {"roles": ["clinician"], "purpose_of_use": "treatment"}
    settings = AgentAuthSettings(local=LocalIdentity(id="desk-1", claims=claims, scopes=("mcp.read",)))
    subject = local_subject(settings)
    assert (subject.id, subject.authn, subject.scopes, subject.claims) == (
        "desk-1",
        "local",
        ("mcp.read",),
        claims,
    )
    subject.claims["roles"].append("admin")
    assert local_subject(settings).claims == claims


def test_missing_local_identity_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as info:
        local_subject(AgentAuthSettings())
    assert (info.value.code, info.value.key) == ("config_invalid", "auth.local")
