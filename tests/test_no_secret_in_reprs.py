"""No secret shows in any printed form of a settings object, or of an object built from settings.

A fully populated configuration names every secret the sidecar reads (OPA bearer token, SMART
client secret and private key, audit and ID-map DSNs with passwords, Redis URLs with passwords,
audit signing and encryption keys); the environment holds a recognisable value for each. Every
settings object in the loaded tree, and every object that holds a resolved secret, is then
formatted every way a developer might (repr, str, f-string, `%s`/`%r` in a log call through our
JSON formatter) and no secret may appear.

`FORMS` and `assert_shows_no_secret` are the scaffolding: another object (for example the call
path's `Call`, with patient ids and a break-glass reason) is covered by adding a test that builds
it and calls `assert_shows_no_secret(obj, needles)`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import BaseModel

from mcp_fhir import config
from mcp_fhir._secret import MASK, Secret, secret_from_env, secret_from_file
from mcp_fhir.agent_auth.api_keys import ApiKeyStore, generate_api_key
from mcp_fhir.ehr.smart import SmartBackendAuth
from mcp_fhir.logs import JsonFormatter
from mcp_fhir.server import _engine_settings


def _rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _ed25519_pem() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )


API_KEY, API_KEY_HASH = generate_api_key()
SECRETS = {
    "T_OPA_TOKEN": "opa-token-7f3a9c1e",
    "T_SMART_SECRET": "smart-client-secret-51d2",
    "T_SMART_KEY": _rsa_pem(),
    "T_AUDIT_DSN": "postgresql://audit:audit-pw-99c1@127.0.0.1:5432/audit",
    "T_IDMAP_DSN": "postgresql://idmap:idmap-pw-3b7e@127.0.0.1:5432/idmap",
    "T_CACHE_REDIS": "redis://:cache-redis-pw-a41f@127.0.0.1:6379/0",
    "T_RATE_REDIS": "redis://:rate-redis-pw-c09d@127.0.0.1:6379/1",
    "T_AUDIT_SIGNING": _ed25519_pem(),
    "T_AUDIT_CIPHER": base64.b64encode(b"k" * 32).decode(),
}


def needles() -> list[str]:
    """What must never appear: each secret whole, and its distinctive part (password, key body)."""
    out = [API_KEY]
    for value in SECRETS.values():
        out.append(value)
        if "@" in value:
            out.append(value.split("://", 1)[1].split("@", 1)[0].split(":")[-1])  # the password
        if "PRIVATE KEY" in value:
            out.append(value.splitlines()[1])  # the first line of the key body
    return out


FULL_CONFIG: dict[str, Any] = {
    "server": {"transport": "http", "port": 8765, "public_url": "https://mcp.example.org/mcp"},
    "auth": {
        "issuer": "https://login.example.org",
        "jwks_url": "https://login.example.org/jwks",
        "api_keys": [{"id": "ward-bot", "hash": API_KEY_HASH, "claims": {"roles": ["nurse"]}}],
    },
    "opa": {"url": "http://127.0.0.1:8181", "token_env": "T_OPA_TOKEN"},
    "backends": {
        "oracle": {
            "base_url": "https://fhir.example.org/r4",
            "smart": {
                "client_id": "c1",
                "auth_method": "client_secret_basic",
                "token_url": "https://fhir.example.org/token",
                "client_secret_env": "T_SMART_SECRET",
            },
            "breaker": {"failure_threshold": 3},
        },
        "epic": {
            "base_url": "https://epic.example.org/r4",
            "profile": "epic",
            "smart": {
                "client_id": "c2",
                "token_url": "https://epic.example.org/token",
                "private_key_env": "T_SMART_KEY",
                "key_id": "k1",
            },
        },
    },
    "idmap": {"kind": "postgres", "dsn_env": "T_IDMAP_DSN"},
    "audit": {
        "sink": "postgres",
        "dsn_env": "T_AUDIT_DSN",
        "signing_key_env": "T_AUDIT_SIGNING",
        "encryption_key_env": "T_AUDIT_CIPHER",
        "encryption_key_id": "k2026",
    },
    "cache": {"backend": "redis", "redis_url_env": "T_CACHE_REDIS"},
    "rate_limit": {"store": "redis", "redis_url_env": "T_RATE_REDIS"},
}


def _json_log_line(obj: Any) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.no_secret_in_reprs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("object %s %r", obj, obj)
        logger.warning(obj)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


FORMS: dict[str, Callable[[Any], str]] = {
    "repr": repr,
    "str": str,
    "f-string": lambda o: f"{o} {o!r} {o!s}",
    "%-format": lambda o: "%s %r" % (o, o),  # noqa: UP031 - the old style is what log calls use
    "format()": lambda o: "{} {!r}".format(o, o),  # noqa: UP032
    "json log line": _json_log_line,
}


def assert_shows_no_secret(obj: Any, secrets: Iterable[str]) -> None:
    """Format `obj` every way in FORMS; fail naming the form and the object type if a secret shows."""
    for form, render in FORMS.items():
        text = render(obj)
        for secret in secrets:
            assert secret not in text, f"{form} of {type(obj).__name__} shows a secret"


def settings_objects(node: Any) -> Iterator[Any]:
    """Every settings object in a loaded tree: models, dataclasses, and the mappings and lists holding them."""
    if isinstance(node, BaseModel):
        yield node
        for name in type(node).model_fields:
            yield from settings_objects(getattr(node, name))
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        yield node
        for f in dataclasses.fields(node):
            yield from settings_objects(getattr(node, f.name))
    elif isinstance(node, dict):
        yield node
        for value in node.values():
            yield from settings_objects(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from settings_objects(item)


@pytest.fixture
def loaded(monkeypatch) -> config.Settings:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    settings = config.from_mapping(FULL_CONFIG)
    config.check_environment(settings)
    return settings


def test_every_settings_object_of_a_fully_populated_config_shows_no_secret(loaded):
    objects = list(settings_objects(loaded))
    kinds = {type(o).__name__ for o in objects}
    assert {"Settings", "AgentAuthSettings", "SmartSettings", "AuditSettings", "CacheSettings"} <= kinds
    assert {"RateLimiterSettings", "BreakerSettings", "OpaDeploymentSettings", "IdMapSettings"} <= kinds
    for obj in objects:
        assert_shows_no_secret(obj, needles())


def test_the_opa_engine_settings_hold_the_bearer_token_as_a_secret(loaded):
    engine_settings = _engine_settings(loaded, "http://127.0.0.1:8181")
    assert isinstance(engine_settings.token, Secret)
    assert engine_settings.token.reveal() == SECRETS["T_OPA_TOKEN"]
    assert_shows_no_secret(engine_settings, needles())


async def test_a_smart_client_holding_its_client_secret_shows_none_of_it(loaded):
    smart = loaded.smart_settings("oracle")
    assert smart is not None
    async with httpx2.AsyncClient() as http:
        auth = SmartBackendAuth(smart, backend="oracle", scopes=["system/*.rs"], http_client=http)
        assert_shows_no_secret(auth, needles())
        assert_shows_no_secret(vars(auth), needles())


def test_the_api_key_store_holds_no_key_material(loaded):
    store = ApiKeyStore(loaded.auth.api_keys)
    assert store.verify(API_KEY).id == "ward-bot"
    assert_shows_no_secret(store, [API_KEY])
    assert_shows_no_secret(vars(store), [API_KEY])


@pytest.mark.parametrize("form", list(FORMS))
def test_a_secret_prints_as_a_mask_in_every_form_and_reveals_only_on_request(form):
    secret = Secret("s3cr3t-value")
    assert "s3cr3t-value" not in FORMS[form](secret)
    assert MASK in FORMS[form](secret)
    assert secret.reveal() == secret.get_secret_value() == "s3cr3t-value"


def test_secrets_compare_by_value_and_never_equal_a_plain_string():
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"


def test_a_secret_is_immutable_and_cannot_be_pickled():
    import pickle

    secret = Secret("x")
    with pytest.raises(AttributeError):
        secret._value = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_a_secret_read_from_an_unset_variable_is_a_config_error_naming_the_key():
    with pytest.raises(config.ConfigError) as caught:
        secret_from_env("T_SURELY_UNSET_VARIABLE", "opa.token_env", environ={})
    assert (caught.value.code, caught.value.key) == ("config_invalid", "opa.token_env")


def test_a_secret_read_from_a_file_drops_the_trailing_newline_and_hides_the_value(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("file-secret-1234\n", encoding="utf-8")
    secret = secret_from_file(path, "backends.x.smart.client_secret_file")
    assert secret.reveal() == "file-secret-1234"
    assert_shows_no_secret(secret, ["file-secret-1234"])
    with pytest.raises(config.ConfigError) as caught:
        secret_from_file(tmp_path / "absent", "backends.x.smart.client_secret_file")
    assert caught.value.key == "backends.x.smart.client_secret_file"


def test_the_postgres_audit_sink_holds_its_dsn_as_a_secret(loaded):
    from mcp_fhir.audit.trail import build_sink

    sink = build_sink(loaded.audit)
    assert_shows_no_secret(sink, needles())
    assert_shows_no_secret(vars(sink), needles())


async def test_the_access_token_the_verifier_hands_the_sdk_holds_no_credential(loaded):
    from mcp_fhir.agent_auth.verifier import AgentTokenVerifier

    verifier = AgentTokenVerifier(None, ApiKeyStore(loaded.auth.api_keys))
    access = await verifier.verify_token(API_KEY)
    assert access is not None and access.client_id == "ward-bot"
    assert_shows_no_secret(access, [API_KEY])
    assert_shows_no_secret(access.model_dump(), [API_KEY])
