"""SMART Backend Services client (mcp_fhir/ehr/smart.py) against scripted HTTP answers.

The verifying token endpoint tests live in tests/integration/test_smart_backend.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mcp_fhir._exceptions import ConfigError, UpstreamAuthError, UpstreamError
from mcp_fhir.ehr.smart import (
    ASSERTION_LIFETIME_SECONDS,
    SmartBackendAuth,
    SmartSettings,
    build_http_client,
    with_token_retry,
)
from mcp_fhir.metrics import REGISTRY
from tests.data import VENDOR_SAMPLES

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2

SAMPLES = VENDOR_SAMPLES
TOKEN_URL = "https://ehr.example.org/oauth2/token"
FHIR_URL = "https://ehr.example.org/fhir/r4"
SECRET = "s3cr3t value/with:odd&chars"
Handler = Callable[[httpx2.Request], httpx2.Response]


class SmartClock:
    """A settable clock, injected into the client."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def smart_es384_pem() -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _token_body(token: str = "tok-1", expires_in: int = 300, **extra: Any) -> dict[str, Any]:
    return {"access_token": token, "token_type": "Bearer", "expires_in": expires_in, **extra}


def _jwt_auth(
    handler: Handler,
    pem: str,
    *,
    clock: SmartClock | None = None,
    settings: dict[str, Any] | None = None,
    scopes: tuple[str, ...] = ("system/Observation.rs",),
) -> SmartBackendAuth:
    raw = {
        "client_id": "sidecar",
        "token_url": TOKEN_URL,
        "private_key_env": "PK",
        "key_id": "k1",
        "algorithm": "ES384",
    }
    raw.update(settings or {})
    return SmartBackendAuth(
        SmartSettings.from_mapping(raw, prefix="backends.epic.smart"),
        backend="epic",
        scopes=scopes,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        clock=clock or SmartClock(),
        environ={"PK": pem},
    )


def _basic_auth(handler: Handler, *, clock: SmartClock | None = None) -> SmartBackendAuth:
    settings = SmartSettings(
        client_id="side car",
        auth_method="client_secret_basic",
        token_url=TOKEN_URL,
        client_secret_env="SECRET",
    )
    return SmartBackendAuth(
        settings,
        backend="cerner",
        scopes=("system/Patient.read",),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        clock=clock or SmartClock(),
        environ={"SECRET": SECRET},
    )


def _form(request: httpx2.Request) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(request.content.decode()))


def _counter(backend: str, outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("mcp_fhir_token_refreshes_total", {"backend": backend, "outcome": outcome})
        or 0.0
    )


# -- settings ------------------------------------------------------------------------------------


def test_a_missing_client_id_names_the_key_with_the_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        SmartSettings.from_mapping({"token_url": TOKEN_URL}, prefix="backends.epic.smart")
    assert info.value.code == "config_invalid"
    assert info.value.key == "backends.epic.smart.client_id"


def test_an_inline_client_secret_is_refused() -> None:
    raw = {
        "client_id": "a",
        "token_url": TOKEN_URL,
        "auth_method": "client_secret_basic",
        "client_secret": "x",
    }
    with pytest.raises(ConfigError) as info:
        SmartSettings.from_mapping(raw, prefix="backends.b.smart")
    assert info.value.key == "backends.b.smart.client_secret"


def test_an_unknown_setting_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        SmartSettings.from_mapping({"client_id": "a", "token_url": TOKEN_URL, "tokenurl": "x"})
    assert info.value.key == "smart.tokenurl"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"auth_method": "client_secret_post"}, "auth_method"),
        ({"algorithm": "RS256"}, "algorithm"),
        ({"algorithm": "none"}, "algorithm"),
        ({"key_id": None}, "key_id"),
        ({"private_key_env": None}, "private_key_file"),
        ({"private_key_file": "/k.pem"}, "private_key_file"),
        ({"scope_syntax": "v3"}, "scope_syntax"),
        ({"refresh_skew_seconds": -1}, "refresh_skew_seconds"),
        ({"token_timeout": 0}, "token_timeout"),
        ({"token_timeout": 1e9}, "token_timeout"),
        ({"token_url": "http://ehr.example.org/token"}, "token_url"),
        ({"token_url": "ftp://ehr.example.org/token"}, "token_url"),
        ({"token_url": None}, "token_url"),
        ({"client_key": "/k.pem"}, "client_key"),
    ],
)
def test_invalid_settings_name_the_offending_key(override: dict[str, Any], key: str) -> None:
    raw = {
        "client_id": "a",
        "token_url": TOKEN_URL,
        "private_key_env": "PK",
        "key_id": "k1",
        "algorithm": "ES384",
    }
    raw.update(override)
    with pytest.raises(ConfigError) as info:
        SmartSettings.from_mapping(raw, prefix="backends.epic.smart")
    assert info.value.key == f"backends.epic.smart.{key}"


def test_an_additional_key_repeating_the_active_kid_is_refused() -> None:
    raw = {
        "client_id": "a",
        "token_url": TOKEN_URL,
        "private_key_env": "PK",
        "key_id": "k1",
        "additional_keys": [{"key_id": "k1", "private_key_env": "OLD"}],
    }
    with pytest.raises(ConfigError) as info:
        SmartSettings.from_mapping(raw, prefix="p")
    assert info.value.key == "p.additional_keys[0].key_id"


def test_plain_http_is_allowed_on_loopback_only() -> None:
    SmartSettings(client_id="a", token_url="http://127.0.0.1:9/token", private_key_env="PK", key_id="k")
    with pytest.raises(ConfigError):
        SmartSettings(client_id="a", token_url="http://10.0.0.1/token", private_key_env="PK", key_id="k")


def test_an_unset_secret_environment_variable_fails_at_construction() -> None:
    settings = SmartSettings(
        client_id="a",
        auth_method="client_secret_basic",
        token_url=TOKEN_URL,
        client_secret_env="NOPE",
        prefix="x",
    )
    with pytest.raises(ConfigError) as info:
        SmartBackendAuth(settings, backend="b", scopes=(), http_client=httpx2.AsyncClient(), environ={})
    assert info.value.key == "x.client_secret_env"


def test_a_client_secret_can_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    settings = SmartSettings(
        client_id="a", auth_method="client_secret_basic", token_url=TOKEN_URL, client_secret_file=str(path)
    )
    auth = SmartBackendAuth(settings, backend="b", scopes=(), http_client=httpx2.AsyncClient(), environ={})
    assert SECRET not in repr(auth)


async def test_build_http_client_uses_a_verified_context() -> None:
    settings = SmartSettings(client_id="a", token_url=TOKEN_URL, private_key_env="PK", key_id="k")
    async with build_http_client(settings) as client:
        assert isinstance(client, httpx2.AsyncClient)


# -- private_key_jwt -----------------------------------------------------------------------------


async def test_the_client_assertion_follows_smart_and_epic_rules(smart_es384_pem: str) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=_token_body(f"tok-{len(seen)}"))

    clock = SmartClock()
    auth = _jwt_auth(handler, smart_es384_pem, clock=clock)
    await auth.token()
    await auth.invalidate("tok-1")
    await auth.token()
    forms = [_form(r) for r in seen]
    assert [f["grant_type"] for f in forms] == ["client_credentials"] * 2
    assert forms[0]["scope"] == "system/Observation.rs"
    assert forms[0]["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert "authorization" not in seen[0].headers
    jwks = auth.public_jwks()
    key = jwt.PyJWK(jwks["keys"][0]).key
    header = jwt.get_unverified_header(forms[0]["client_assertion"])
    claims = jwt.decode(
        forms[0]["client_assertion"],
        key,
        algorithms=["ES384"],
        audience=TOKEN_URL,
        options={"verify_exp": False},
    )
    assert header == {"alg": "ES384", "kid": "k1", "typ": "JWT"}
    assert claims["iss"] == claims["sub"] == "sidecar"
    assert claims["aud"] == TOKEN_URL
    assert claims["iat"] == int(clock.now)
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME_SECONDS
    assert 0 < len(claims["jti"]) <= 151
    second = jwt.decode(
        forms[1]["client_assertion"],
        key,
        algorithms=["ES384"],
        audience=TOKEN_URL,
        options={"verify_exp": False},
    )
    assert second["jti"] != claims["jti"]


async def test_a_jti_longer_than_epic_allows_is_never_sent(smart_es384_pem: str) -> None:
    calls: list[httpx2.Request] = []
    auth = SmartBackendAuth(
        SmartSettings(
            client_id="a", token_url=TOKEN_URL, private_key_env="PK", key_id="k", algorithm="ES384"
        ),
        backend="epic",
        scopes=(),
        http_client=httpx2.AsyncClient(
            transport=httpx2.MockTransport(lambda r: calls.append(r) or httpx2.Response(200))
        ),
        environ={"PK": smart_es384_pem},
        jti_factory=lambda: "x" * 152,
    )
    with pytest.raises(UpstreamAuthError):
        await auth.token()
    assert calls == []


# -- client_secret_basic -------------------------------------------------------------------------


async def test_client_secret_basic_form_urlencodes_id_and_secret_into_the_basic_header() -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, json=_token_body())

    await _basic_auth(handler).token()
    scheme, _, encoded = seen[0].headers["authorization"].partition(" ")
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    assert scheme == "Basic"
    assert user == "side+car"
    assert urllib.parse.unquote_plus(password) == SECRET
    assert ":" not in password and "&" not in password
    assert _form(seen[0]) == {"grant_type": "client_credentials", "scope": "system/Patient.read"}


# -- discovery -----------------------------------------------------------------------------------


async def test_discovery_reads_the_token_endpoint_from_a_real_vendor_configuration(
    smart_es384_pem: str,
) -> None:
    # Source: Oracle Health (Cerner) R4_WELL_KNOWN, cerner/fhir.cerner.com (vendor-samples SOURCES.md §2).
    config = json.loads((SAMPLES / "cerner_smart_configuration.json").read_text())
    paths: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        paths.append(str(request.url))
        if request.url.path.endswith("/.well-known/smart-configuration"):
            return httpx2.Response(200, json=config)
        return httpx2.Response(200, json=_token_body())

    auth = _jwt_auth(handler, smart_es384_pem, settings={"token_url": None, "fhir_base_url": FHIR_URL + "/"})
    await auth.token()
    await auth.invalidate("tok-1")
    await auth.token()
    assert paths == [
        FHIR_URL + "/.well-known/smart-configuration",
        config["token_endpoint"],
        config["token_endpoint"],
    ]


async def test_the_smart_spec_configuration_with_trailing_commas_is_a_clear_auth_error(
    smart_es384_pem: str,
) -> None:
    # Source: HL7 SMART App Launch IG example-backend-services.md step 2, published with trailing commas.
    text = (
        SAMPLES / "smart_spec_backend_services_smart_configuration_INVALID_trailing_commas.json.txt"
    ).read_bytes()
    auth = _jwt_auth(
        lambda r: httpx2.Response(200, content=text, headers={"content-type": "application/json"}),
        smart_es384_pem,
        settings={"token_url": None, "fhir_base_url": FHIR_URL},
    )
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.code == "upstream_auth_failed"
    assert info.value.details["reason"] == "bad_discovery"
    assert "JSON" in info.value.message


async def test_discovery_refuses_an_ehr_that_does_not_offer_our_auth_method(smart_es384_pem: str) -> None:
    config = {"token_endpoint": TOKEN_URL, "token_endpoint_auth_methods_supported": ["client_secret_basic"]}
    auth = _jwt_auth(
        lambda r: httpx2.Response(200, json=config),
        smart_es384_pem,
        settings={"token_url": None, "fhir_base_url": FHIR_URL},
    )
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.details["reason"] == "unsupported"


async def test_discovery_refuses_an_ehr_that_does_not_offer_our_signing_algorithm(
    smart_es384_pem: str,
) -> None:
    config = {"token_endpoint": TOKEN_URL, "token_endpoint_auth_signing_alg_values_supported": ["RS384"]}
    auth = _jwt_auth(
        lambda r: httpx2.Response(200, json=config),
        smart_es384_pem,
        settings={"token_url": None, "fhir_base_url": FHIR_URL},
    )
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.details["reason"] == "unsupported"


async def test_discovery_refuses_a_plain_http_token_endpoint(smart_es384_pem: str) -> None:
    config = {"token_endpoint": "http://ehr.example.org/token"}
    auth = _jwt_auth(
        lambda r: httpx2.Response(200, json=config),
        smart_es384_pem,
        settings={"token_url": None, "fhir_base_url": FHIR_URL},
    )
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.details["reason"] == "bad_discovery"


# -- failures ------------------------------------------------------------------------------------


async def test_an_oauth_error_reports_the_status_and_error_code_but_never_the_description(
    smart_es384_pem: str,
) -> None:
    body = {"error": "invalid_client", "error_description": "Patient Jane Doe MRN 12345"}
    before = _counter("epic", "error")
    auth = _jwt_auth(lambda r: httpx2.Response(401, json=body), smart_es384_pem)
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.code == "upstream_auth_failed"
    assert info.value.details == {"reason": "rejected", "status": 401}
    assert "invalid_client" in str(info.value)
    assert "Jane" not in str(info.value) and "12345" not in str(info.value)
    assert _counter("epic", "error") == before + 1


async def test_an_error_code_that_is_not_a_plain_oauth_code_is_not_echoed(smart_es384_pem: str) -> None:
    auth = _jwt_auth(lambda r: httpx2.Response(400, json={"error": "Bearer eyJsecret"}), smart_es384_pem)
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert "eyJ" not in str(info.value)


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (httpx2.ReadTimeout("slow"), "upstream_timeout", "timeout"),
        (httpx2.ConnectTimeout("slow"), "upstream_timeout", "timeout"),
        (httpx2.ConnectError("no"), "upstream_auth_failed", "transport"),
    ],
)
async def test_transport_failures_become_upstream_errors_and_timeouts_are_upstream_timeouts(
    smart_es384_pem: str, exc: Exception, code: str, reason: str
) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise exc

    with pytest.raises(UpstreamError) as info:
        await _jwt_auth(handler, smart_es384_pem).token()
    assert info.value.code == code
    assert info.value.details["reason"] == reason
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    "response",
    [
        httpx2.Response(200, content=b"<html>login</html>"),
        httpx2.Response(200, json=["not", "an", "object"]),
        httpx2.Response(200, json={"token_type": "bearer", "expires_in": 60}),
        httpx2.Response(200, json={"access_token": "t", "token_type": "mac", "expires_in": 60}),
        httpx2.Response(200, json={"access_token": "t", "token_type": "bearer", "expires_in": -5}),
        httpx2.Response(200, json={"access_token": "t", "token_type": "bearer", "expires_in": "soon"}),
    ],
)
async def test_malformed_token_responses_are_rejected(
    smart_es384_pem: str, response: httpx2.Response
) -> None:
    with pytest.raises(UpstreamAuthError) as info:
        await _jwt_auth(lambda r: response, smart_es384_pem).token()
    assert info.value.details["reason"] == "bad_response"


async def test_a_successful_request_is_counted_as_ok(smart_es384_pem: str) -> None:
    before = _counter("epic", "ok")
    await _jwt_auth(lambda r: httpx2.Response(200, json=_token_body()), smart_es384_pem).token()
    assert _counter("epic", "ok") == before + 1


# -- caching, refresh, single flight -------------------------------------------------------------


async def test_the_token_is_cached_until_the_refresh_skew(smart_es384_pem: str) -> None:
    calls: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(200, json=_token_body(f"tok-{len(calls)}", expires_in=120))

    clock = SmartClock()
    auth = _jwt_auth(handler, smart_es384_pem, clock=clock, settings={"refresh_skew_seconds": 60})
    assert await auth.token() == "tok-1"
    clock.now += 59
    assert await auth.token() == "tok-1"
    clock.now += 2
    assert await auth.token() == "tok-2"
    assert len(calls) == 2


async def test_a_token_shorter_than_twice_the_skew_is_still_reused_for_half_its_life(
    smart_es384_pem: str,
) -> None:
    calls: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(200, json=_token_body(f"tok-{len(calls)}", expires_in=30))

    clock = SmartClock()
    auth = _jwt_auth(handler, smart_es384_pem, clock=clock, settings={"refresh_skew_seconds": 60})
    await auth.token()
    clock.now += 14
    assert await auth.token() == "tok-1"
    clock.now += 2
    assert await auth.token() == "tok-2"


async def test_concurrent_callers_share_one_failing_request(smart_es384_pem: str) -> None:
    calls: list[int] = []
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        started.set()
        await release.wait()
        return httpx2.Response(503, json={"error": "temporarily_unavailable"})

    auth = _jwt_auth(handler, smart_es384_pem)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(auth.token()) for _ in range(20)]
    await started.wait()
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(calls) == 1
    assert all(isinstance(r, UpstreamAuthError) for r in results)


async def test_a_cancelled_caller_does_not_cancel_the_shared_request(smart_es384_pem: str) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        started.set()
        await release.wait()
        return httpx2.Response(200, json=_token_body())

    auth = _jwt_auth(handler, smart_es384_pem)  # type: ignore[arg-type]
    first = asyncio.create_task(auth.token())
    second = asyncio.create_task(auth.token())
    await started.wait()
    first.cancel()
    release.set()
    assert await second == "tok-1"


async def test_granted_scopes_come_from_the_response_or_default_to_the_request(smart_es384_pem: str) -> None:
    narrowed = _jwt_auth(
        lambda r: httpx2.Response(200, json=_token_body(scope="system/Observation.r")),
        smart_es384_pem,
        scopes=("system/Observation.rs", "system/Patient.r"),
    )
    assert narrowed.granted_scopes == {"system/Observation.rs", "system/Patient.r"}
    await narrowed.token()
    assert narrowed.granted_scopes == {"system/Observation.r"}
    silent = _jwt_auth(lambda r: httpx2.Response(200, json=_token_body()), smart_es384_pem)
    await silent.token()
    assert silent.granted_scopes == {"system/Observation.rs"}


async def test_invalidate_keeps_a_newer_token_another_caller_fetched(smart_es384_pem: str) -> None:
    calls: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(200, json=_token_body(f"tok-{len(calls)}"))

    auth = _jwt_auth(handler, smart_es384_pem)
    old = await auth.token()
    await auth.invalidate(old)
    new = await auth.token()
    await auth.invalidate(old)  # a late caller still holding the old token
    assert await auth.token() == new == "tok-2"
    assert len(calls) == 2


# -- with_token_retry ----------------------------------------------------------------------------


async def test_a_401_triggers_exactly_one_retry_with_a_fresh_token(smart_es384_pem: str) -> None:
    issued: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        issued.append(1)
        return httpx2.Response(200, json=_token_body(f"tok-{len(issued)}"))

    auth = _jwt_auth(handler, smart_es384_pem)
    sent: list[str] = []

    async def send(token: str) -> httpx2.Response:
        sent.append(token)
        return httpx2.Response(401 if token == "tok-1" else 200)

    response = await with_token_retry(auth, send)
    assert response.status_code == 200
    assert sent == ["tok-1", "tok-2"]


async def test_a_second_401_raises_an_upstream_auth_error(smart_es384_pem: str) -> None:
    auth = _jwt_auth(lambda r: httpx2.Response(200, json=_token_body()), smart_es384_pem)
    sent: list[str] = []

    async def send(token: str) -> httpx2.Response:
        sent.append(token)
        return httpx2.Response(401)

    with pytest.raises(UpstreamAuthError) as info:
        await with_token_retry(auth, send)
    assert info.value.details["reason"] == "retry_failed"
    assert len(sent) == 2


async def test_a_non_401_answer_is_returned_without_a_retry(smart_es384_pem: str) -> None:
    auth = _jwt_auth(lambda r: httpx2.Response(200, json=_token_body()), smart_es384_pem)
    sent: list[str] = []

    async def send(token: str) -> httpx2.Response:
        sent.append(token)
        return httpx2.Response(403)

    assert (await with_token_retry(auth, send)).status_code == 403
    assert sent == ["tok-1"]


# -- redaction -----------------------------------------------------------------------------------


def test_reprs_never_show_secrets_or_keys(smart_es384_pem: str) -> None:
    auth = _basic_auth(lambda r: httpx2.Response(500))
    assert "[secure]" in repr(auth)
    assert SECRET not in repr(auth)
    jwt_auth = _jwt_auth(lambda r: httpx2.Response(500), smart_es384_pem)
    assert "PRIVATE" not in repr(jwt_auth)


async def test_a_cached_token_never_appears_in_error_messages_or_logs(
    smart_es384_pem: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="mcp_fhir.ehr.smart")
    auth = _basic_auth(lambda r: httpx2.Response(200, json=_token_body("very-secret-token")))
    await auth.token()

    async def send(token: str) -> httpx2.Response:
        return httpx2.Response(401)

    with pytest.raises(UpstreamAuthError) as info:
        await with_token_retry(auth, send)
    assert "very-secret-token" not in str(info.value)
    assert "very-secret-token" not in caplog.text and SECRET not in caplog.text
    assert "cerner" in caplog.text


# -- Retry-After from the token endpoint (issue #19) ---------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "hold"),
    [(503, {"Retry-After": "30"}, 30.0), (429, {"Retry-After": "30"}, 30.0), (429, {}, 1.0)],
)
async def test_a_token_endpoint_retry_after_holds_every_token_request_until_it_expires(
    smart_es384_pem: str, status: int, headers: dict[str, str], hold: float
) -> None:
    answers = [httpx2.Response(status, headers=headers, json={"error": "temporarily_unavailable"})]
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return answers.pop(0) if answers else httpx2.Response(200, json=_token_body())

    clock = SmartClock()
    auth = _jwt_auth(handler, smart_es384_pem, clock=clock)
    with pytest.raises(UpstreamAuthError) as first:
        await auth.token()
    clock.now += hold - 0.5
    with pytest.raises(UpstreamAuthError) as held:
        await auth.token()
    assert len(seen) == 1  # nothing was sent while held
    assert first.value.details["reason"] == "rejected"
    assert held.value.details["reason"] == "held"
    clock.now += 0.5
    assert await auth.token() == "tok-1"
    assert len(seen) == 2


async def test_a_5xx_without_retry_after_does_not_hold_the_token_endpoint(smart_es384_pem: str) -> None:
    answers = [httpx2.Response(503)]

    def handler(request: httpx2.Request) -> httpx2.Response:
        return answers.pop(0) if answers else httpx2.Response(200, json=_token_body())

    auth = _jwt_auth(handler, smart_es384_pem)
    with pytest.raises(UpstreamAuthError):
        await auth.token()
    assert await auth.token() == "tok-1"


async def test_a_still_valid_token_is_used_while_the_endpoint_is_held(smart_es384_pem: str) -> None:
    answers = [httpx2.Response(200, json=_token_body("tok-1", expires_in=300)), httpx2.Response(429)]

    def handler(request: httpx2.Request) -> httpx2.Response:
        return answers.pop(0) if answers else httpx2.Response(200, json=_token_body("tok-2"))

    clock = SmartClock()
    auth = _jwt_auth(handler, smart_es384_pem, clock=clock, settings={"refresh_skew_seconds": 60})
    assert await auth.token() == "tok-1"
    clock.now += 250  # past refresh_at (240 s), before expiry (300 s)
    with pytest.raises(UpstreamAuthError):
        await auth.token()  # the refresh gets a 429: held for 1 s
    assert await auth.token() == "tok-1"  # still valid: used, nothing sent


async def test_the_token_endpoint_hold_is_capped(smart_es384_pem: str) -> None:
    answers = [httpx2.Response(503, headers={"Retry-After": "3000"})]

    def handler(request: httpx2.Request) -> httpx2.Response:
        return answers.pop(0) if answers else httpx2.Response(200, json=_token_body())

    clock = SmartClock()
    auth = SmartBackendAuth(
        SmartSettings(
            client_id="a", token_url=TOKEN_URL, private_key_env="PK", key_id="k", algorithm="ES384"
        ),
        backend="epic",
        scopes=(),
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        environ={"PK": smart_es384_pem},
        clock=clock,
        max_retry_after=5.0,
    )
    with pytest.raises(UpstreamAuthError):
        await auth.token()
    clock.now += 5.0
    assert await auth.token() == "tok-1"
