"""SMART Backend Services end to end: our client against the verifying test token endpoint
(tests/testbed/token_server.py, uvicorn on loopback), and through its token-checking proxy in front of
the real FHIR test bed when that is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import jwt
import pytest

from mcp_fhir._exceptions import UpstreamAuthError
from mcp_fhir.ehr.keys import public_jwks, signing_key_from_pem
from mcp_fhir.ehr.scopes import required_scopes, unavailable_tools
from mcp_fhir.ehr.smart import (
    SmartBackendAuth,
    SmartSettings,
    build_http_client,
    with_token_retry,
)
from tests.testbed.token_server import RegisteredClient, TokenServer, make_private_key_pem, start_token_server

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2

SECRET = "integration secret: not & real"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
CATALOGUE: dict[str, tuple[str, tuple[str, ...]]] = {
    "read_patient": ("read", ("Patient",)),
    "search_observations": ("search", ("Observation",)),
    "create_clinical_note": ("create", ("DocumentReference",)),
}


class SmartSharedClock:
    """One settable clock for the client and the token server, so both agree on 'now'."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def smart_keys() -> dict[str, bytes]:
    return {
        "rs-1": make_private_key_pem("RS384"),
        "rs-2": make_private_key_pem("RS384"),
        "es-1": make_private_key_pem("ES384"),
        "intruder": make_private_key_pem("RS384"),
    }


def _jwks(keys: dict[str, bytes], *kids: str) -> dict[str, Any]:
    algorithm = {"rs-1": "RS384", "rs-2": "RS384", "es-1": "ES384"}
    return public_jwks([signing_key_from_pem(keys[k], kid=k, algorithm=algorithm[k], key="t") for k in kids])


@pytest.fixture
def smart_clock() -> SmartSharedClock:
    return SmartSharedClock()


@pytest.fixture
def smart_server(smart_keys: dict[str, bytes], smart_clock: SmartSharedClock) -> Iterator[TokenServer]:
    clients = [
        RegisteredClient("jwt-client", jwks=_jwks(smart_keys, "rs-1", "rs-2", "es-1")),
        RegisteredClient("basic-client", secret=SECRET),
    ]
    with start_token_server(clients, expires_in=300, clock=smart_clock) as server:
        yield server


@pytest.fixture
async def smart_http() -> AsyncIterator[httpx2.AsyncClient]:
    settings = SmartSettings(
        client_id="x", token_url="http://127.0.0.1:1/token", private_key_env="PK", key_id="k"
    )
    async with build_http_client(settings) as client:
        yield client


def _auth(
    server: TokenServer,
    http: httpx2.AsyncClient,
    clock: Any,
    keys: dict[str, bytes],
    *,
    kid: str = "rs-1",
    pem_kid: str | None = None,
    scopes: tuple[str, ...] = ("system/Observation.rs",),
    **overrides: Any,
) -> SmartBackendAuth:
    algorithm = "ES384" if kid.startswith("es") else "RS384"
    raw: dict[str, Any] = {
        "client_id": "jwt-client",
        "token_url": server.token_url,
        "private_key_env": "PK",
        "key_id": kid,
        "algorithm": algorithm,
    }
    jti_factory = overrides.pop("jti_factory", None)
    raw.update(overrides)
    return SmartBackendAuth(
        SmartSettings.from_mapping(raw, prefix="backends.test.smart"),
        backend="test",
        scopes=scopes,
        http_client=http,
        clock=clock,
        environ={"PK": keys[pem_kid or kid].decode(), "OLD": keys["rs-1"].decode()},
        jti_factory=jti_factory,
    )


async def test_client_secret_basic_gets_a_token(
    smart_server: TokenServer, smart_http: httpx2.AsyncClient
) -> None:
    settings = SmartSettings(
        client_id="basic-client",
        auth_method="client_secret_basic",
        token_url=smart_server.token_url,
        client_secret_env="SECRET",
    )
    auth = SmartBackendAuth(
        settings,
        backend="test",
        scopes=("system/Patient.r",),
        http_client=smart_http,
        environ={"SECRET": SECRET},
    )
    assert smart_server.introspect(await auth.token())


async def test_a_wrong_client_secret_is_rejected(
    smart_server: TokenServer, smart_http: httpx2.AsyncClient
) -> None:
    settings = SmartSettings(
        client_id="basic-client",
        auth_method="client_secret_basic",
        token_url=smart_server.token_url,
        client_secret_env="SECRET",
    )
    auth = SmartBackendAuth(
        settings, backend="test", scopes=(), http_client=smart_http, environ={"SECRET": "nope"}
    )
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.code == "upstream_auth_failed"
    assert smart_server.rejections == ["invalid_client"]


@pytest.mark.parametrize("kid", ["rs-1", "es-1"], ids=["RS384", "ES384"])
async def test_private_key_jwt_gets_a_token(
    kid: str,
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(smart_server, smart_http, smart_clock, smart_keys, kid=kid)
    token = await auth.token()
    assert smart_server.introspect(token)
    assert smart_server.token_requests == 1
    assert smart_server.rejections == []


async def test_discovery_through_smart_configuration_gets_a_token(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(
        smart_server,
        smart_http,
        smart_clock,
        smart_keys,
        token_url=None,
        fhir_base_url=smart_server.fhir_base_url,
    )
    assert smart_server.introspect(await auth.token())


async def test_an_assertion_signed_with_an_unregistered_key_is_rejected(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(smart_server, smart_http, smart_clock, smart_keys, kid="rs-1", pem_kid="intruder")
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.code == "upstream_auth_failed"
    assert info.value.details["status"] == 401
    assert smart_server.rejections == ["invalid_client"]


async def test_an_expired_assertion_is_rejected(
    smart_server: TokenServer, smart_http: httpx2.AsyncClient, smart_keys: dict[str, bytes]
) -> None:
    client_clock = SmartSharedClock()
    client_clock.now -= 600  # our assertion's exp (now + 240 s) is already in the server's past
    auth = _auth(smart_server, smart_http, client_clock, smart_keys)
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.code == "upstream_auth_failed"
    assert smart_server.rejections == ["invalid_client"]


async def test_an_assertion_expiring_more_than_five_minutes_ahead_is_rejected(
    smart_server: TokenServer, smart_http: httpx2.AsyncClient, smart_keys: dict[str, bytes]
) -> None:
    client_clock = SmartSharedClock()
    client_clock.now += 120  # exp lands 360 s ahead of the server's clock
    auth = _auth(smart_server, smart_http, client_clock, smart_keys)
    with pytest.raises(UpstreamAuthError):
        await auth.token()
    assert smart_server.rejections == ["invalid_client"]


async def test_a_reused_jti_is_rejected_as_a_replay(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(
        smart_server, smart_http, smart_clock, smart_keys, jti_factory=lambda: "fixed-jti-for-replay"
    )
    first = await auth.token()
    await auth.invalidate(first)
    with pytest.raises(UpstreamAuthError) as info:
        await auth.token()
    assert info.value.code == "upstream_auth_failed"
    assert smart_server.token_requests == 2
    assert smart_server.rejections == ["invalid_client"]


async def test_the_token_is_refreshed_once_it_is_within_the_skew_of_expiry(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    smart_server.expires_in = 120
    auth = _auth(smart_server, smart_http, smart_clock, smart_keys, refresh_skew_seconds=60)
    first = await auth.token()
    smart_clock.now += 59
    assert await auth.token() == first
    assert smart_server.token_requests == 1
    smart_clock.now += 2  # 61 s in: under 60 s left
    second = await auth.token()
    assert second != first
    assert smart_server.token_requests == 2


async def test_fifty_concurrent_callers_at_expiry_cause_exactly_one_token_request(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(smart_server, smart_http, smart_clock, smart_keys)
    first = await auth.token()
    smart_clock.now += 301
    tokens = await asyncio.gather(*(auth.token() for _ in range(50)))
    assert smart_server.token_requests == 2
    assert len(set(tokens)) == 1
    assert tokens[0] != first


async def test_a_401_from_the_fhir_endpoint_triggers_one_retry_with_a_fresh_token(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(smart_server, smart_http, smart_clock, smart_keys)
    stale = await auth.token()
    smart_server.expire(stale)  # the EHR now answers 401 to it, though our clock says it is fine
    used: list[str] = []

    async def send(token: str) -> httpx2.Response:
        used.append(token)
        return await smart_http.get(
            f"{smart_server.fhir_base_url}/Observation", headers={"Authorization": f"Bearer {token}"}
        )

    response = await with_token_retry(auth, send)
    assert response.status_code == 200
    assert used[0] == stale and used[1] != stale and len(used) == 2
    assert smart_server.token_requests == 2


async def test_the_proxy_refuses_a_missing_or_unknown_token(
    smart_server: TokenServer, smart_http: httpx2.AsyncClient
) -> None:
    assert (await smart_http.get(f"{smart_server.fhir_base_url}/Patient")).status_code == 401
    response = await smart_http.get(
        f"{smart_server.fhir_base_url}/Patient", headers={"Authorization": "Bearer x"}
    )
    assert response.status_code == 401


async def test_introspection_over_http_reports_active_and_expired_tokens(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    token = await _auth(smart_server, smart_http, smart_clock, smart_keys).token()
    url = f"{smart_server.base_url}/introspect"
    assert (await smart_http.post(url, data={"token": token})).json() == {"active": True}
    smart_clock.now += 301
    assert (await smart_http.post(url, data={"token": token})).json() == {"active": False}


async def test_key_rotation_switching_kid_still_authenticates(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    before = _auth(smart_server, smart_http, smart_clock, smart_keys, kid="rs-1")
    after = _auth(
        smart_server,
        smart_http,
        smart_clock,
        smart_keys,
        kid="rs-2",
        additional_keys=[{"key_id": "rs-1", "algorithm": "RS384", "private_key_env": "OLD"}],
    )
    assert smart_server.introspect(await before.token())
    assert smart_server.introspect(await after.token())
    published = after.public_jwks()
    assert [k["kid"] for k in published["keys"]] == ["rs-2", "rs-1"]
    assert published == _jwks(smart_keys, "rs-2", "rs-1")


async def test_the_published_jwks_never_contains_private_members(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    auth = _auth(
        smart_server,
        smart_http,
        smart_clock,
        smart_keys,
        kid="rs-2",
        additional_keys=[{"key_id": "rs-1", "algorithm": "RS384", "private_key_env": "OLD"}],
    )
    for jwk in auth.public_jwks()["keys"]:
        assert not PRIVATE_MEMBERS & set(jwk)
        assert jwk["use"] == "sig" and jwk["key_ops"] == ["verify"]


async def test_a_narrower_grant_marks_the_uncovered_tools_unavailable(
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    enabled = list(CATALOGUE)
    scopes = tuple(required_scopes(enabled, syntax="v2", catalogue=CATALOGUE))
    smart_server.granted_scope = "system/Observation.rs system/Patient.r"
    auth = _auth(smart_server, smart_http, smart_clock, smart_keys, scopes=scopes)
    await auth.token()
    assert auth.granted_scopes == {"system/Observation.rs", "system/Patient.r"}
    missing = unavailable_tools(enabled, auth.granted_scopes, "v2", CATALOGUE)
    assert missing == {"create_clinical_note": ["system/DocumentReference.c"]}


@pytest.mark.integration
async def test_a_401_refresh_works_against_the_real_fhir_test_bed(
    smart_keys: dict[str, bytes], smart_http: httpx2.AsyncClient
) -> None:
    try:
        from tests.testbed.fhir import TestbedError, start_fhir_server, testbed_unavailable_reason
    except ImportError as exc:
        pytest.skip(f"FHIR test bed module tests.testbed.fhir is not importable yet: {exc}")
    reason = testbed_unavailable_reason()
    if reason:
        pytest.skip(reason)
    clock = SmartSharedClock()
    with contextlib.ExitStack() as stack:
        try:
            fhir = stack.enter_context(start_fhir_server())
        except TestbedError as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"FHIR test bed failed to start (skipped locally, fails in CI): {str(exc)[:200]}")
        clients = [RegisteredClient("jwt-client", jwks=_jwks(smart_keys, "rs-1"))]
        server = stack.enter_context(
            start_token_server(clients, upstream_fhir_url=fhir.base_url, clock=clock)
        )
        auth = _auth(server, smart_http, clock, smart_keys, scopes=("system/Patient.r",))
        stale = await auth.token()
        server.expire(stale)

        async def send(token: str) -> httpx2.Response:
            return await smart_http.get(
                f"{server.fhir_base_url}/Patient/pat-au-001", headers={"Authorization": f"Bearer {token}"}
            )

        response = await with_token_retry(auth, send)
        assert response.status_code == 200
        assert response.json()["resourceType"] == "Patient"
        assert response.json()["id"] == "pat-au-001"
        assert server.token_requests == 2
        assert server.proxied_requests == 1


def _raw_assertion(keys: dict[str, bytes], audience: str, now: float, **claims: Any) -> str:
    payload = {
        "iss": "jwt-client",
        "sub": "jwt-client",
        "aud": audience,
        "exp": int(now) + 60,
        "jti": str(now),
    }
    payload.update(claims)
    key = signing_key_from_pem(keys["rs-1"], kid="rs-1", algorithm="RS384", key="t").private_key
    return jwt.encode(payload, key, algorithm="RS384", headers={"kid": "rs-1"})


@pytest.mark.parametrize(
    ("claims", "assertion_type"),
    [
        (
            {"aud": "https://other.example.org/token"},
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ({"sub": "someone-else"}, "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
        ({"jti": "j" * 152}, "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
        ({}, "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"),
    ],
    ids=["wrong-aud", "sub-not-iss", "jti-too-long", "wrong-assertion-type"],
)
async def test_the_token_server_rejects_assertions_a_real_ehr_would_reject(
    claims: dict[str, Any],
    assertion_type: str,
    smart_server: TokenServer,
    smart_http: httpx2.AsyncClient,
    smart_clock: SmartSharedClock,
    smart_keys: dict[str, bytes],
) -> None:
    assertion = _raw_assertion(smart_keys, smart_server.token_url, smart_clock.now, **claims)
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": assertion_type,
        "client_assertion": assertion,
    }
    response = await smart_http.post(smart_server.token_url, data=form)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}
    good = _raw_assertion(smart_keys, smart_server.token_url, smart_clock.now, jti="a-fresh-jti")
    ok = await smart_http.post(
        smart_server.token_url,
        data={**form, "client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": good},
    )
    assert ok.status_code == 200  # the same request with a well-formed assertion is accepted
