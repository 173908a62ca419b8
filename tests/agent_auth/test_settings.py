"""AgentAuthSettings validate on construction and name the failing key."""

from __future__ import annotations

import datetime as dt

import pytest

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.api_keys import hash_api_key
from mcp_fhir.agent_auth.settings import DEFAULT_ALGORITHMS, AgentAuthSettings

ISS = "https://login.example.org"
AUD = "https://mcp.example.org/mcp"
H1, H2 = hash_api_key("mfk_1"), hash_api_key("mfk_2")


def _key(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        AgentAuthSettings.from_mapping(data)
    assert info.value.code == "config_invalid"
    return info.value.key


def test_a_full_yaml_section_builds():
    settings = AgentAuthSettings.from_mapping(
        {
            "issuer": ISS,
            "resource_server_url": AUD,
            "required_scopes": ["mcp.read"],
            "jwks": {"ttl_seconds": 600},
            "api_keys": [
                {
                    "id": "bot",
                    "hash": hash_api_key("mfk_x"),
                    "claims": {"roles": ["nurse"]},
                    "expires": "2026-12-31",
                }
            ],
            "local": {"id": "desk", "scopes": ["mcp.read"]},
        }
    )
    assert settings.audience == AUD and settings.accepts_jwt
    assert settings.allowed_algorithms == DEFAULT_ALGORITHMS
    assert settings.api_keys[0].expires == dt.date(2026, 12, 31)
    assert settings.jwks.ttl_seconds == 600.0


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"issuer": ISS, "audience": AUD, "allowed_algorithms": ["HS256"]}, "auth.allowed_algorithms"),
        ({"issuer": ISS, "audience": AUD, "allowed_algorithms": ["none"]}, "auth.allowed_algorithms"),
        ({"issuer": ISS, "audience": AUD, "allowed_algorithms": []}, "auth.allowed_algorithms"),
        ({"issuer": "http://login.example.org", "audience": AUD}, "auth.issuer"),
        ({"issuer": ISS, "audience": "mcp"}, "auth.audience"),
        ({"issuer": ISS}, "auth.audience"),
        ({"issuer": ISS, "audience": AUD, "leeway_seconds": 3600}, "auth.leeway_seconds"),
        ({"issuer": ISS, "audience": AUD, "jwks": {"ttl_seconds": 10, "min_refresh_seconds": 60}},
         "auth.jwks.min_refresh_seconds"),
        ({"issuer": ISS, "audience": AUD, "jwks": {"timeout_seconds": 0}}, "auth.jwks.timeout_seconds"),
        ({"issuer": ISS, "audience": AUD, "colour": "blue"}, "auth.colour"),
        ({"api_keys": [{"id": "a", "hash": "md5:abc"}]}, "auth.api_keys[0].hash"),
        ({"api_keys": [{"id": "a"}]}, "auth.api_keys[0].hash"),
        ({"api_keys": [{"id": "a", "hash": H1, "expires": "soon"}]}, "auth.api_keys[0].expires"),
        ({"api_keys": [{"id": "a", "hash": H1}, {"id": "a", "hash": H2}]}, "auth.api_keys"),
        ({"api_keys": [{"id": "a", "hash": hash_api_key("mfk_1"), "scopes": "mcp.read"}]},
         "auth.api_keys[0].scopes"),
        ({"local": {"claims": {}}}, "auth.local.id"),
        ({"required_scopes": ["has space"]}, "auth.required_scopes"),
    ],
)  # fmt: skip
def test_invalid_settings_name_the_key(data, key):
    assert _key(data) == key


def test_loopback_issuers_may_use_plain_http_for_tests():
    settings = AgentAuthSettings(issuer="http://127.0.0.1:9000", audience="http://localhost:8000/mcp")
    assert settings.accepts_jwt


def test_api_key_entry_repr_never_shows_the_hash():
    digest = hash_api_key("mfk_secret")
    settings = AgentAuthSettings.from_mapping({"api_keys": [{"id": "a", "hash": digest}]})
    assert digest.removeprefix("sha256:") not in repr(settings)
