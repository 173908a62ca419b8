"""SMART Backend Services: the sidecar as an OAuth 2.0 client of the EHR (client_credentials grant).

One ``SmartBackendAuth`` per backend hands out a cached access token::

    settings = SmartSettings.from_mapping(raw, prefix="backends.epic.smart")
    async with build_http_client(settings) as http:          # the caller owns the client's lifecycle
        auth = SmartBackendAuth(settings, backend="epic", scopes=required_scopes(...), http_client=http)
        response = await with_token_retry(auth, lambda token: http.get(url, headers=bearer(token)))

How a token is obtained:

1. the token endpoint is ``token_url`` or, when absent, ``token_endpoint`` from
   ``{fhir_base_url}/.well-known/smart-configuration`` (fetched once; must be a JSON object, and must
   list our auth method and signing algorithm when it lists any);
2. the client_credentials grant (its form built by Authlib's ``prepare_token_request``) authenticates
   with ``private_key_jwt``, signed by **Authlib** (``PrivateKeyJWT`` through ``OAuth2ClientAuth``: an
   RFC 7523 client assertion, RS384 or ES384, header ``alg``/``kid``/``typ``; claims ``iss`` = ``sub`` =
   client_id, ``aud`` = token endpoint, ``iat``, ``exp`` = now + ``ASSERTION_LIFETIME_SECONDS`` (240 s,
   inside SMART's and Epic's 5-minute limit, with room for clock skew), a fresh random ``jti`` of 43
   characters (Epic allows at most 151)), or with ``client_secret_basic`` (RFC 6749 §2.3.1:
   form-urlencoded id and secret in HTTP Basic; hand-written, because Authlib's encoder skips the
   form-urlencoding, see ``_client_auth``);
3. a 429, or a 5xx carrying Retry-After, from the token endpoint holds it: no discovery or token request
   is sent before it expires (capped by the backend's ``max_retry_after``); meanwhile a still-valid
   cached token is used, and without one the call fails at once (``reason`` ``held``);
4. hand-written, because Authlib has no counterpart: SMART discovery, the checks on the token
   response (bearer, positive ``expires_in``, granted scopes), the error seam that never echoes a
   secret, and the cache below, which Authlib's clients do not share between concurrent callers;
5. the token is cached until ``refresh_skew_seconds`` before it expires (capped at half its lifetime, so
   a short-lived token does not cause a request per call). Refresh is single-flight: concurrent callers
   share ONE in-flight request, and share its failure too.

Deadline: ``token_timeout`` bounds each phase of a discovery or token request (connect, write, each
read) AND the whole request, body included, so that an endpoint trickling its answer cannot hold a
call for longer (issue #19). Passing it is an ``UpstreamTimeout`` (code ``upstream_timeout``,
``details["reason"]`` ``timeout``), as for every other upstream request.

Errors: every other failure, including unreachable endpoints, is an ``UpstreamAuthError`` (code
``upstream_auth_failed``), with ``details["reason"]`` one of ``transport``, ``rejected``,
``bad_response``, ``bad_discovery``, ``unsupported``, ``retry_failed``, ``held``; the ``reason`` lets a
breaker tell transient from permanent. Messages carry the HTTP status and the OAuth ``error`` code only,
never a token, secret, assertion or ``error_description``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx2
from authlib.integrations.httpx_client import OAuth2ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import ECKey, RSAKey

from mcp_fhir._exceptions import ConfigError, UpstreamAuthError, UpstreamTimeout
from mcp_fhir._secret import Secret
from mcp_fhir.ehr.keys import ALLOWED_ALGORITHMS, SigningKey, load_signing_key, public_jwks
from mcp_fhir.ehr.tls import build_ssl_context
from mcp_fhir.metrics import TOKEN_REFRESHES
from mcp_fhir.resilience.ratelimit import MAX_RETRY_AFTER_SECONDS, parse_retry_after

__all__ = [
    "ASSERTION_LIFETIME_SECONDS",
    "AUTH_METHODS",
    "DEFAULT_REFRESH_SKEW_SECONDS",
    "DEFAULT_TOKEN_TIMEOUT",
    "AdditionalKey",
    "SmartBackendAuth",
    "SmartSettings",
    "TokenSource",
    "build_http_client",
    "with_token_retry",
]

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_TIMEOUT = 10.0
MAX_TOKEN_TIMEOUT = 120.0
DEFAULT_REFRESH_SKEW_SECONDS = 60.0
MAX_REFRESH_SKEW_SECONDS = 3600.0
ASSERTION_LIFETIME_SECONDS = 240
MAX_JTI_LENGTH = 151
DEFAULT_EXPIRES_IN_SECONDS = 300.0
MAX_RESPONSE_BYTES = 256 * 1024
MAX_CLIENT_SECRET_BYTES = 4096
DEFAULT_MAX_CONNECTIONS = 10
FORM = "application/x-www-form-urlencoded"
SMART_CONFIGURATION_PATH = "/.well-known/smart-configuration"
AUTH_METHODS: frozenset[str] = frozenset({"client_secret_basic", "private_key_jwt"})
SCOPE_SYNTAXES: frozenset[str] = frozenset({"v1", "v2"})
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_OAUTH_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


def _check_url(value: str, key: str) -> None:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ConfigError(key, "must be an absolute http(s) URL")
    if parsed.scheme == "http" and parsed.hostname not in _LOOPBACK_HOSTS:
        raise ConfigError(key, "must use https (plain http is allowed only on loopback)")
    if parsed.username or parsed.password:
        raise ConfigError(key, "must not carry credentials")


def _exactly_one(a: str | None, b: str | None, key: str, names: str) -> None:
    if (a is None) == (b is None):
        raise ConfigError(key, f"set exactly one of {names}")


@dataclass(frozen=True)
class AdditionalKey:
    """An older (or next) signing key, published in our JWKS so rotation by ``kid`` is seamless."""

    key_id: str
    algorithm: str = "RS384"
    private_key_file: str | None = None
    private_key_env: str | None = None


@dataclass(frozen=True)
class SmartSettings:
    """One backend's SMART Backend Services settings, validated on construction.

    Secrets are never inline: a client secret comes from ``client_secret_env`` or ``client_secret_file``,
    a private key from ``private_key_env`` or ``private_key_file`` (PEM). ``prefix`` is the config path
    used in every ``ConfigError`` (for example ``backends.epic.smart``).
    """

    client_id: str = ""
    auth_method: str = "private_key_jwt"
    token_url: str | None = None
    fhir_base_url: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    private_key_file: str | None = None
    private_key_env: str | None = None
    key_id: str | None = None
    algorithm: str = "RS384"
    additional_keys: tuple[AdditionalKey, ...] = ()
    scope_syntax: str = "v2"
    refresh_skew_seconds: float = DEFAULT_REFRESH_SKEW_SECONDS
    token_timeout: float = DEFAULT_TOKEN_TIMEOUT
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    prefix: str = field(default="smart", compare=False)

    def __post_init__(self) -> None:
        p = self.prefix
        if not isinstance(self.client_id, str) or not self.client_id.strip():
            raise ConfigError(f"{p}.client_id", "is required")
        if self.auth_method not in AUTH_METHODS:
            raise ConfigError(f"{p}.auth_method", f"must be one of {sorted(AUTH_METHODS)}")
        if self.token_url is None and self.fhir_base_url is None:
            raise ConfigError(f"{p}.token_url", "is required unless fhir_base_url is set for discovery")
        if self.token_url is not None:
            _check_url(self.token_url, f"{p}.token_url")
        if self.fhir_base_url is not None:
            _check_url(self.fhir_base_url, f"{p}.fhir_base_url")
        if self.auth_method == "client_secret_basic":
            _exactly_one(
                self.client_secret_env,
                self.client_secret_file,
                f"{p}.client_secret_env",
                "client_secret_env or client_secret_file",
            )
        else:
            _exactly_one(
                self.private_key_file,
                self.private_key_env,
                f"{p}.private_key_file",
                "private_key_file or private_key_env",
            )
            if not self.key_id:
                raise ConfigError(f"{p}.key_id", "is required for private_key_jwt")
            if self.algorithm not in ALLOWED_ALGORITHMS:
                raise ConfigError(f"{p}.algorithm", f"must be one of {sorted(ALLOWED_ALGORITHMS)}")
        for index, extra in enumerate(self.additional_keys):
            key = f"{p}.additional_keys[{index}]"
            if not isinstance(extra, AdditionalKey):
                raise ConfigError(key, "must be a mapping with key_id, algorithm and a key source")
            if not extra.key_id:
                raise ConfigError(f"{key}.key_id", "is required")
            earlier = {k.key_id for k in self.additional_keys[:index]} | {self.key_id}
            if extra.key_id in earlier:
                raise ConfigError(f"{key}.key_id", "repeats another key_id")
            if extra.algorithm not in ALLOWED_ALGORITHMS:
                raise ConfigError(f"{key}.algorithm", f"must be one of {sorted(ALLOWED_ALGORITHMS)}")
            _exactly_one(
                extra.private_key_file, extra.private_key_env, key, "private_key_file or private_key_env"
            )
        if self.scope_syntax not in SCOPE_SYNTAXES:
            raise ConfigError(f"{p}.scope_syntax", "must be 'v1' or 'v2'")
        skew = self.refresh_skew_seconds
        if (
            isinstance(skew, bool)
            or not isinstance(skew, int | float)
            or not 0 <= skew <= MAX_REFRESH_SKEW_SECONDS
        ):
            raise ConfigError(
                f"{p}.refresh_skew_seconds", f"must be a number from 0 to {MAX_REFRESH_SKEW_SECONDS}"
            )
        timeout = self.token_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_TOKEN_TIMEOUT
        ):
            raise ConfigError(
                f"{p}.token_timeout", f"must be a number above 0 and at most {MAX_TOKEN_TIMEOUT}"
            )
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError(f"{p}.client_key", "needs client_cert as well")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, prefix: str = "smart") -> SmartSettings:
        """Build from a YAML/env mapping; unknown keys and inline secrets are rejected by name."""
        for forbidden in ("client_secret", "private_key"):
            if forbidden in raw:
                raise ConfigError(f"{prefix}.{forbidden}", "must not be inline; use the _env or _file form")
        allowed = {f.name for f in fields(cls)} - {"prefix"}
        for name in raw:
            if name not in allowed:
                raise ConfigError(f"{prefix}.{name}", "is not a known setting")
        values = dict(raw)
        extras = values.pop("additional_keys", None) or []
        if not isinstance(extras, Sequence) or isinstance(extras, str | bytes):
            raise ConfigError(f"{prefix}.additional_keys", "must be a list")
        parsed: list[AdditionalKey] = []
        extra_names = {f.name for f in fields(AdditionalKey)}
        for index, item in enumerate(extras):
            key = f"{prefix}.additional_keys[{index}]"
            if not isinstance(item, Mapping):
                raise ConfigError(key, "must be a mapping")
            for name in item:
                if name not in extra_names:
                    raise ConfigError(f"{key}.{name}", "is not a known setting")
            parsed.append(AdditionalKey(**item))
        return cls(**values, additional_keys=tuple(parsed), prefix=prefix)


def build_http_client(settings: SmartSettings) -> httpx2.AsyncClient:
    """One long-lived client for this backend's token endpoint, with the verified TLS context."""
    context = build_ssl_context(
        settings.ca_bundle, settings.client_cert, settings.client_key, prefix=settings.prefix
    )
    return httpx2.AsyncClient(
        verify=context,
        timeout=httpx2.Timeout(settings.token_timeout),
        follow_redirects=False,
        trust_env=False,
        limits=httpx2.Limits(max_connections=DEFAULT_MAX_CONNECTIONS),
    )


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)
    expires_at: float
    refresh_at: float
    scopes: frozenset[str]

    def __repr__(self) -> str:
        return f"_Token(value=[secure], expires_at={self.expires_at})"


class TokenSource(Protocol):
    """Anything that hands out bearer tokens and can drop a rejected one."""

    async def token(self) -> str: ...

    async def invalidate(self, token: str) -> None: ...


@contextlib.asynccontextmanager
async def _translate_http_errors(step: str, deadline: float) -> AsyncIterator[None]:
    """The one seam where httpx2 failures become upstream errors (no URL, no body in the message).

    ``deadline`` bounds the whole exchange: a timeout of any kind is ``UpstreamTimeout``.
    """
    try:
        async with asyncio.timeout(deadline):
            yield
    except (httpx2.TimeoutException, TimeoutError) as exc:
        raise UpstreamTimeout(f"{step}: timed out", reason="timeout") from exc
    except httpx2.HTTPError as exc:
        raise UpstreamAuthError(f"{step}: {type(exc).__name__}", reason="transport") from exc


def _json_object(response: httpx2.Response, step: str, reason: str) -> dict[str, Any]:
    if len(response.content) > MAX_RESPONSE_BYTES:
        raise UpstreamAuthError(f"{step}: response larger than {MAX_RESPONSE_BYTES} bytes", reason=reason)
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise UpstreamAuthError(f"{step}: response is not valid JSON", reason=reason) from exc
    if not isinstance(body, dict):
        raise UpstreamAuthError(f"{step}: response is not a JSON object", reason=reason)
    return body


def _jose_key(key: SigningKey) -> RSAKey | ECKey:
    """The joserfc form of one of our signing keys (Authlib takes a key object, not PEM text)."""
    private = key.private_key
    if isinstance(private, rsa.RSAPrivateKey):
        return RSAKey.import_key(private)
    return ECKey.import_key(private)


class SmartBackendAuth:
    """Cached, single-flight SMART Backend Services access tokens for one backend."""

    def __init__(
        self,
        settings: SmartSettings,
        *,
        backend: str,
        scopes: Sequence[str],
        http_client: httpx2.AsyncClient,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        jti_factory: Callable[[], str] | None = None,
        max_retry_after: float = MAX_RETRY_AFTER_SECONDS,
    ) -> None:
        self._settings = settings
        self._max_retry_after = max_retry_after
        self._not_before = -math.inf  # the token endpoint's Retry-After: no request before this time
        self._backend = backend
        self._requested = tuple(scopes)
        self._http = http_client
        self._clock = clock
        self._new_jti = jti_factory or (lambda: secrets.token_urlsafe(32))
        env = os.environ if environ is None else environ
        self._secret: Secret | None = None
        self._keys: tuple[SigningKey, ...] = ()
        if settings.auth_method == "client_secret_basic":
            self._secret = Secret(self._load_secret(settings, env))
        else:
            self._keys = self._load_keys(settings, env)
        # Authlib signs with joserfc keys; only the active key (the first) ever signs.
        self._jose_keys: tuple[RSAKey | ECKey, ...] = tuple(_jose_key(k) for k in self._keys[:1])
        self._token_endpoint: str | None = settings.token_url
        self._current: _Token | None = None
        self._inflight: asyncio.Task[_Token] | None = None

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(backend={self._backend!r}, client_id={self._settings.client_id!r}, "
            f"auth_method={self._settings.auth_method!r}, credentials=[secure])"
        )

    @staticmethod
    def _load_secret(settings: SmartSettings, env: Mapping[str, str]) -> str:
        p = settings.prefix
        if settings.client_secret_env is not None:
            value = env.get(settings.client_secret_env, "")
            if not value:
                raise ConfigError(
                    f"{p}.client_secret_env", "names an environment variable that is unset or empty"
                )
            return value
        path = Path(settings.client_secret_file or "")
        try:
            raw = path.read_bytes()[: MAX_CLIENT_SECRET_BYTES + 1]
        except OSError as exc:
            raise ConfigError(f"{p}.client_secret_file", "cannot be read") from exc
        if len(raw) > MAX_CLIENT_SECRET_BYTES:
            raise ConfigError(f"{p}.client_secret_file", f"is larger than {MAX_CLIENT_SECRET_BYTES} bytes")
        value = raw.decode("utf-8", errors="strict").strip()
        if not value:
            raise ConfigError(f"{p}.client_secret_file", "is empty")
        return value

    @staticmethod
    def _load_keys(settings: SmartSettings, env: Mapping[str, str]) -> tuple[SigningKey, ...]:
        active = load_signing_key(
            file=settings.private_key_file,
            env=settings.private_key_env,
            kid=settings.key_id or "",
            algorithm=settings.algorithm,
            key=settings.prefix,
            environ=env,
        )
        extra = [
            load_signing_key(
                file=item.private_key_file,
                env=item.private_key_env,
                kid=item.key_id,
                algorithm=item.algorithm,
                key=f"{settings.prefix}.additional_keys[{index}]",
                environ=env,
            )
            for index, item in enumerate(settings.additional_keys)
        ]
        return (active, *extra)

    @property
    def granted_scopes(self) -> frozenset[str]:
        """What the EHR granted with the current token (what we asked for, until a token says otherwise)."""
        if self._current is None:
            return frozenset(self._requested)
        return self._current.scopes

    @property
    def requested_scopes(self) -> tuple[str, ...]:
        return self._requested

    def public_jwks(self) -> dict[str, Any]:
        """Our JWKS (active key first, then the additional keys); empty for client_secret_basic."""
        return public_jwks(self._keys)

    async def token(self) -> str:
        """A valid access token: cached, or fetched by exactly one request shared by all waiting callers."""
        current = self._current
        now = self._clock()
        if current is not None and now < current.refresh_at:
            return current.value
        if now < self._not_before:  # the endpoint asked us to come back later: do not ask it sooner
            if current is not None and now < current.expires_at:
                return current.value
            raise UpstreamAuthError(
                "SMART token endpoint asked to wait (Retry-After)",
                reason="held",
                retry_in_seconds=round(self._not_before - now, 3),
            )
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh())
            self._inflight = task
            task.add_done_callback(self._forget_inflight)
        fresh = await asyncio.shield(task)
        return fresh.value

    async def invalidate(self, token: str) -> None:
        """Drop ``token`` if it is still the cached one (a newer token from another caller is kept)."""
        current = self._current
        if current is not None and hmac.compare_digest(current.value.encode(), token.encode()):
            self._current = None

    def _forget_inflight(self, task: asyncio.Task[_Token]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already got it through the shield

    async def _refresh(self) -> _Token:
        try:
            endpoint = await self._discover()
            fresh = await self._request_token(endpoint)
        except (UpstreamAuthError, UpstreamTimeout) as exc:
            TOKEN_REFRESHES.labels(backend=self._backend, outcome="error").inc()
            logger.warning(
                "SMART token request failed backend=%s code=%s reason=%s",
                self._backend,
                exc.code,
                exc.details.get("reason"),
            )
            raise
        TOKEN_REFRESHES.labels(backend=self._backend, outcome="ok").inc()
        self._current = fresh
        logger.info(
            "SMART token obtained backend=%s lifetime=%.0fs", self._backend, fresh.expires_at - self._clock()
        )
        return fresh

    async def _discover(self) -> str:
        if self._token_endpoint is not None:
            return self._token_endpoint
        base = (self._settings.fhir_base_url or "").rstrip("/")
        step = "SMART discovery"
        async with _translate_http_errors(step, self._settings.token_timeout):
            response = await self._http.get(
                base + SMART_CONFIGURATION_PATH,
                headers={"Accept": "application/json"},
                timeout=self._settings.token_timeout,
            )
        if response.status_code != 200:
            raise UpstreamAuthError(f"{step}: HTTP {response.status_code}", reason="bad_discovery")
        config = _json_object(response, step, "bad_discovery")
        endpoint = config.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise UpstreamAuthError(f"{step}: no token_endpoint", reason="bad_discovery")
        try:
            _check_url(endpoint, "token_endpoint")
        except ConfigError as exc:
            raise UpstreamAuthError(f"{step}: token_endpoint {exc.rule}", reason="bad_discovery") from exc
        methods = config.get("token_endpoint_auth_methods_supported")
        if isinstance(methods, list) and self._settings.auth_method not in methods:
            raise UpstreamAuthError(
                f"{step}: EHR does not list auth method {self._settings.auth_method}", reason="unsupported"
            )
        algorithms = config.get("token_endpoint_auth_signing_alg_values_supported")
        if (
            self._settings.auth_method == "private_key_jwt"
            and isinstance(algorithms, list)
            and self._settings.algorithm not in algorithms
        ):
            raise UpstreamAuthError(
                f"{step}: EHR does not list signing algorithm {self._settings.algorithm}",
                reason="unsupported",
            )
        self._token_endpoint = endpoint
        return endpoint

    def _client_auth(self, endpoint: str) -> tuple[httpx2.Auth | None, dict[str, str]]:
        """(an httpx2 ``auth`` that signs the request, extra headers) that authenticate this client.

        ``private_key_jwt``: Authlib's :class:`PrivateKeyJWT` (RFC 7523) adds a fresh client assertion
        to the form, signed with the active key, with ``iss`` = ``sub`` = client_id, ``aud`` = the
        token endpoint, and our ``iat``, ``exp`` (240 s) and ``jti`` (checked against Epic's limit
        before anything is sent). A new method object per request: Authlib fills missing claims into
        the dict it is given, so a shared one would repeat a ``jti``.

        ``client_secret_basic``: our own four lines. RFC 6749 §2.3.1 form-urlencodes the id and the
        secret before Base64; Authlib's ``encode_client_secret_basic`` does not, so a secret holding
        ``:``, ``%`` or ``+`` would reach the EHR as a different secret.
        """
        if self._secret is not None:
            user = urllib.parse.quote_plus(self._settings.client_id, safe="")
            password = urllib.parse.quote_plus(self._secret.reveal(), safe="")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            return None, {"Authorization": f"Basic {basic}"}
        key = self._keys[0]
        now = int(self._clock())
        jti = self._new_jti()
        if not jti or len(jti) > MAX_JTI_LENGTH:
            raise UpstreamAuthError(
                f"client assertion jti must be 1 to {MAX_JTI_LENGTH} characters", reason="bad_jti"
            )
        method = PrivateKeyJWT(
            endpoint,
            claims={"iat": now, "exp": now + ASSERTION_LIFETIME_SECONDS, "jti": jti},
            headers={"kid": key.kid, "typ": "JWT"},
            alg=key.algorithm,
        )
        return OAuth2ClientAuth(self._settings.client_id, self._jose_keys[0], method), {}

    async def _request_token(self, endpoint: str) -> _Token:
        step = "SMART token request"
        auth, headers = self._client_auth(endpoint)
        body = prepare_token_request("client_credentials", scope=" ".join(self._requested) or None)
        started = self._clock()
        async with _translate_http_errors(step, self._settings.token_timeout):
            response = await self._http.post(
                endpoint,
                content=body,
                headers={"Accept": "application/json", "Content-Type": FORM, **headers},
                auth=auth if auth is not None else httpx2.USE_CLIENT_DEFAULT,
                timeout=self._settings.token_timeout,
            )
        if response.status_code != 200:
            self._hold(response)
            raise UpstreamAuthError(
                f"{step}: HTTP {response.status_code} {self._oauth_error(response)}",
                reason="rejected",
                status=response.status_code,
            )
        token = _json_object(response, step, "bad_response")
        return self._parse_token(token, started, step)

    def _hold(self, response: httpx2.Response) -> None:
        """A 429, or a 5xx with Retry-After: send the endpoint nothing until it expires (capped)."""
        status, header = response.status_code, response.headers.get("Retry-After")
        if status == 429 or (status >= 500 and header is not None):
            wait = parse_retry_after(header, self._clock(), cap=self._max_retry_after)
            self._not_before = self._clock() + wait

    @staticmethod
    def _oauth_error(response: httpx2.Response) -> str:
        """The OAuth ``error`` code if it is a plain code; never ``error_description``."""
        with contextlib.suppress(ValueError):
            body = json.loads(response.content[:MAX_RESPONSE_BYTES])
            if isinstance(body, dict):
                code = body.get("error")
                if isinstance(code, str) and _OAUTH_ERROR_CODE.match(code):
                    return code
        return "no_error_code"

    def _parse_token(self, body: Mapping[str, Any], started: float, step: str) -> _Token:
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise UpstreamAuthError(f"{step}: no access_token", reason="bad_response")
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise UpstreamAuthError(f"{step}: token_type is not bearer", reason="bad_response")
        raw_expires = body.get("expires_in", DEFAULT_EXPIRES_IN_SECONDS)
        if isinstance(raw_expires, bool) or not isinstance(raw_expires, int | float) or raw_expires <= 0:
            raise UpstreamAuthError(f"{step}: expires_in is not a positive number", reason="bad_response")
        lifetime = float(raw_expires)
        skew = min(self._settings.refresh_skew_seconds, lifetime / 2)
        raw_scope = body.get("scope")
        scopes = frozenset(raw_scope.split()) if isinstance(raw_scope, str) else frozenset(self._requested)
        return _Token(
            value=value, expires_at=started + lifetime, refresh_at=started + lifetime - skew, scopes=scopes
        )


class _HasStatus(Protocol):
    @property
    def status_code(self) -> int: ...


R = TypeVar("R", bound=_HasStatus)


async def with_token_retry(auth: TokenSource, send: Callable[[str], Awaitable[R]]) -> R:
    """Call ``send(token)``; on a 401, drop that token and retry exactly once with a fresh one.

    A second 401 raises ``UpstreamAuthError`` (reason ``retry_failed``): the EHR rejects even a fresh token.
    """
    token = await auth.token()
    response = await send(token)
    if response.status_code != 401:
        return response
    await auth.invalidate(token)
    fresh = await auth.token()
    response = await send(fresh)
    if response.status_code == 401:
        raise UpstreamAuthError(
            "EHR rejected a freshly issued token (HTTP 401)", reason="retry_failed", status=401
        )
    return response
