"""Settings for agent authentication (the ``auth`` section), validated when they are built.

Every rule that fails raises ``ConfigError("auth.<key>", rule)`` naming the key. Nothing
here holds a secret: API keys are configured by their ``sha256:<hex>`` digest only.

YAML shape accepted by :meth:`AgentAuthSettings.from_mapping`::

    auth:
      issuer: https://login.example.org          # exact `iss`; also the discovery base
      jwks_url: https://login.example.org/jwks   # optional; else discovered from the issuer
      audience: https://mcp.example.org/mcp      # this server's canonical URI (RFC 8707)
      allowed_algorithms: [RS256, ES256]         # default RS256 RS384 ES256 ES384 PS256
      leeway_seconds: 30
      required_scopes: [mcp.read]
      on_behalf_of_claim: null                   # default: the `act` claim's `sub` (RFC 8693)
      jwks: {ttl_seconds: 300, min_refresh_seconds: 30, timeout_seconds: 5}
      api_keys:
        - {id: ward-bot, hash: "sha256:…", scopes: [mcp.read], claims: {roles: [nurse]},
           on_behalf_of: null, expires: 2026-12-31}
      local: {id: local-dev, claims: {roles: [clinician]}, scopes: [mcp.read]}
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from mcp_fhir._exceptions import ConfigError

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_JWKS_MIN_REFRESH_INTERVAL",
    "DEFAULT_JWKS_TIMEOUT",
    "DEFAULT_JWKS_TTL",
    "DEFAULT_LEEWAY",
    "MAX_LEEWAY",
    "SUPPORTED_ALGORITHMS",
    "AgentAuthSettings",
    "ApiKeyEntry",
    "JwksSettings",
    "LocalIdentity",
]

DEFAULT_ALGORITHMS: Final[tuple[str, ...]] = ("RS256", "RS384", "ES256", "ES384", "PS256")
# Asymmetric algorithms only: `none` and HS* can never be configured.
SUPPORTED_ALGORITHMS: Final[frozenset[str]] = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
DEFAULT_LEEWAY: Final = 30.0
MAX_LEEWAY: Final = 300.0
DEFAULT_JWKS_TTL: Final = 300.0
DEFAULT_JWKS_MIN_REFRESH_INTERVAL: Final = 30.0
DEFAULT_JWKS_TIMEOUT: Final = 5.0
MAX_JWKS_TIMEOUT: Final = 60.0

_HASH_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_SCOPE_RE: Final = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(key: str, value: str, *, allow_path: bool = True) -> str:
    """An absolute https URL (http only for loopback), no fragment, no credentials."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a non-empty URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(key, "must be an absolute http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(key, "must use https unless the host is loopback")
    if parts.fragment or parts.username or parts.password:
        raise ConfigError(key, "must not carry a fragment or credentials")
    if not allow_path and parts.path not in ("", "/"):
        raise ConfigError(key, "must not have a path")
    return value


def _check_scopes(key: str, scopes: Any) -> tuple[str, ...]:
    if isinstance(scopes, str) or not isinstance(scopes, Sequence):
        raise ConfigError(key, "must be a list of scope strings")
    out = tuple(scopes)
    for scope in out:
        if not isinstance(scope, str) or not _SCOPE_RE.fullmatch(scope):
            raise ConfigError(key, "each scope must be a non-empty RFC 6749 scope token")
    return out


def _check_id(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ConfigError(key, "must be 1-128 characters of letters, digits and ._:@/-")
    return value


def _check_claims(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(key, "must be a mapping with string keys")
    return copy.deepcopy(dict(value))


def _positive(key: str, value: Any, *, maximum: float | None = None, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, "must be a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, "must be positive")
    if maximum is not None and value > maximum:
        raise ConfigError(key, f"must be at most {maximum:g}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ApiKeyEntry:
    """One API key, configured by its digest only. ``expires``: last valid day, inclusive, UTC.

    The key itself (``id``, ``hash``, ``expires``), then the subject it authenticates as."""

    id: str
    hash: str
    expires: dt.date | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    scopes: tuple[str, ...] = ()
    on_behalf_of: str | None = None
    key_prefix: str = field(default="auth.api_keys[]", compare=False)

    def __post_init__(self) -> None:
        p = self.key_prefix
        _check_id(f"{p}.id", self.id)
        if not isinstance(self.hash, str) or not _HASH_RE.fullmatch(self.hash):
            raise ConfigError(f"{p}.hash", "must be 'sha256:' followed by 64 lowercase hex digits")
        object.__setattr__(self, "claims", _check_claims(f"{p}.claims", self.claims))
        object.__setattr__(self, "scopes", _check_scopes(f"{p}.scopes", self.scopes))
        if self.on_behalf_of is not None and (
            not isinstance(self.on_behalf_of, str) or not self.on_behalf_of
        ):
            raise ConfigError(f"{p}.on_behalf_of", "must be a non-empty string when set")
        if self.expires is not None and (
            not isinstance(self.expires, dt.date) or isinstance(self.expires, dt.datetime)
        ):
            raise ConfigError(f"{p}.expires", "must be a date (YYYY-MM-DD)")

    def __repr__(self) -> str:
        return f"ApiKeyEntry(id={self.id!r}, scopes={len(self.scopes)}, expires={self.expires!s})"


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """The identity of the one local (stdio) caller."""

    id: str
    claims: dict[str, Any] = field(default_factory=dict)
    scopes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_id("auth.local.id", self.id)
        object.__setattr__(self, "claims", _check_claims("auth.local.claims", self.claims))
        object.__setattr__(self, "scopes", _check_scopes("auth.local.scopes", self.scopes))


@dataclass(frozen=True, slots=True)
class JwksSettings:
    """Caching and fetching of the issuer's key set."""

    ttl_seconds: float = DEFAULT_JWKS_TTL
    min_refresh_seconds: float = DEFAULT_JWKS_MIN_REFRESH_INTERVAL
    timeout_seconds: float = DEFAULT_JWKS_TIMEOUT

    def __post_init__(self) -> None:
        ttl = _positive("auth.jwks.ttl_seconds", self.ttl_seconds, maximum=86400.0)
        floor = _positive("auth.jwks.min_refresh_seconds", self.min_refresh_seconds, maximum=ttl)
        timeout = _positive("auth.jwks.timeout_seconds", self.timeout_seconds, maximum=MAX_JWKS_TIMEOUT)
        object.__setattr__(self, "ttl_seconds", ttl)
        object.__setattr__(self, "min_refresh_seconds", floor)
        object.__setattr__(self, "timeout_seconds", timeout)


@dataclass(frozen=True, slots=True)
class AgentAuthSettings:
    """The ``auth`` section. JWTs need ``issuer`` and ``audience``; API keys and local need neither.

    ``audience`` is this server's canonical URI (RFC 8707) and is compared to the token's
    ``aud`` by exact string equality: ``https://h/mcp`` and ``https://h/mcp/`` are different.
    """

    issuer: str | None = None
    audience: str | None = None
    jwks_url: str | None = None
    allowed_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: float = DEFAULT_LEEWAY
    required_scopes: tuple[str, ...] = ()
    on_behalf_of_claim: str | None = None
    jwks: JwksSettings = field(default_factory=JwksSettings)
    api_keys: tuple[ApiKeyEntry, ...] = ()
    local: LocalIdentity | None = None

    def __post_init__(self) -> None:
        if self.issuer is not None:
            _check_url("auth.issuer", self.issuer)
        if self.audience is not None:
            _check_url("auth.audience", self.audience)
        if self.jwks_url is not None:
            _check_url("auth.jwks_url", self.jwks_url)
            if self.issuer is None:
                raise ConfigError("auth.issuer", "is required when auth.jwks_url is set")
        if (self.issuer is None) != (self.audience is None):
            raise ConfigError(
                "auth.audience" if self.audience is None else "auth.issuer",
                "issuer and audience must be set together to accept JWTs",
            )
        algs = self.allowed_algorithms
        if isinstance(algs, str) or not isinstance(algs, Sequence) or not algs:
            raise ConfigError("auth.allowed_algorithms", "must be a non-empty list")
        for alg in algs:
            if alg not in SUPPORTED_ALGORITHMS:
                raise ConfigError(
                    "auth.allowed_algorithms", "only asymmetric JWS algorithms (RS*, PS*, ES*) are allowed"
                )
        object.__setattr__(self, "allowed_algorithms", tuple(algs))
        leeway = _positive("auth.leeway_seconds", self.leeway_seconds, maximum=MAX_LEEWAY, allow_zero=True)
        object.__setattr__(self, "leeway_seconds", leeway)
        object.__setattr__(
            self, "required_scopes", _check_scopes("auth.required_scopes", self.required_scopes)
        )
        if self.on_behalf_of_claim is not None and (
            not isinstance(self.on_behalf_of_claim, str) or not self.on_behalf_of_claim
        ):
            raise ConfigError("auth.on_behalf_of_claim", "must be a non-empty claim name when set")
        if not isinstance(self.jwks, JwksSettings):
            raise ConfigError("auth.jwks", "must be a jwks settings block")
        ids = [k.id for k in self.api_keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("auth.api_keys", "key ids must be unique")
        hashes = [k.hash for k in self.api_keys]
        if len(set(hashes)) != len(hashes):
            raise ConfigError("auth.api_keys", "key hashes must be unique")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))

    @property
    def accepts_jwt(self) -> bool:
        """Whether JWTs can be validated: an issuer and an audience are configured."""
        return self.issuer is not None and self.audience is not None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AgentAuthSettings:
        """Build from the parsed ``auth`` YAML section; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigError("auth", "must be a mapping")
        known = {
            "issuer", "audience", "resource_server_url", "jwks_url", "allowed_algorithms", "leeway_seconds",
            "required_scopes", "on_behalf_of_claim", "jwks", "api_keys", "local",
        }  # fmt: skip
        for key in data:
            if key not in known:
                raise ConfigError(f"auth.{key}", "unknown setting")
        if "audience" in data and "resource_server_url" in data:
            raise ConfigError(
                "auth.resource_server_url", "set either audience or resource_server_url, not both"
            )
        kwargs: dict[str, Any] = {
            k: data[k]
            for k in ("issuer", "jwks_url", "allowed_algorithms", "leeway_seconds", "on_behalf_of_claim")
            if k in data
        }
        audience = data.get("audience", data.get("resource_server_url"))
        if audience is not None:
            kwargs["audience"] = audience
        if "required_scopes" in data:
            kwargs["required_scopes"] = _check_scopes("auth.required_scopes", data["required_scopes"] or ())
        if "jwks" in data:
            jwks = data["jwks"] or {}
            if not isinstance(jwks, Mapping):
                raise ConfigError("auth.jwks", "must be a mapping")
            for key in jwks:
                if key not in ("ttl_seconds", "min_refresh_seconds", "timeout_seconds"):
                    raise ConfigError(f"auth.jwks.{key}", "unknown setting")
            kwargs["jwks"] = JwksSettings(**dict(jwks))
        kwargs["api_keys"] = tuple(
            _api_key_from_mapping(i, e) for i, e in enumerate(data.get("api_keys") or ())
        )
        if data.get("local") is not None:
            local = data["local"]
            if not isinstance(local, Mapping):
                raise ConfigError("auth.local", "must be a mapping")
            for key in local:
                if key not in ("id", "claims", "scopes"):
                    raise ConfigError(f"auth.local.{key}", "unknown setting")
            if "id" not in local:
                raise ConfigError("auth.local.id", "is required")
            kwargs["local"] = LocalIdentity(
                id=local["id"], claims=local.get("claims") or {}, scopes=local.get("scopes") or ()
            )
        return cls(**kwargs)


def _api_key_from_mapping(index: int, entry: Any) -> ApiKeyEntry:
    prefix = f"auth.api_keys[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(prefix, "must be a mapping")
    for key in entry:
        if key not in ("id", "hash", "claims", "scopes", "on_behalf_of", "expires"):
            raise ConfigError(f"{prefix}.{key}", "unknown setting")
    for key in ("id", "hash"):
        if key not in entry:
            raise ConfigError(f"{prefix}.{key}", "is required")
    expires = entry.get("expires")
    if isinstance(expires, str):
        try:
            expires = dt.date.fromisoformat(expires)
        except ValueError as exc:
            raise ConfigError(f"{prefix}.expires", "must be a date (YYYY-MM-DD)") from exc
    return ApiKeyEntry(
        id=entry["id"],
        hash=entry["hash"],
        claims=entry.get("claims") or {},
        scopes=entry.get("scopes") or (),
        on_behalf_of=entry.get("on_behalf_of"),
        expires=expires,
        key_prefix=prefix,
    )
