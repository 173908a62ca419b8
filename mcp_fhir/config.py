"""One validated settings model, loaded from a YAML file and the environment.

Every section is typed and validated once, at load: `Settings.auth` is an `AgentAuthSettings`,
`audit` an `AuditSettings`, `cache` a `CacheSettings` (or None when disabled), `rate_limit` a
`RateLimiterSettings`, and each backend's `smart` and `breaker` a `SmartSettings` and a
`BreakerSettings`. Nothing is kept as a dict and rebuilt on access. Every class is a `...Settings`.

Every error names the key and the rule (`backends.epic.base_url: must be an https URL`), and a
file is checked whole: `load` raises one `ConfigErrors` holding every error found, whose `key`
is the first one's. Rules that span sections (stdio needs `auth.local`, ...) are checked once
every section is valid on its own.

Relative paths written in the file are resolved against the file's own folder, so a config
works from any working directory; defaults (`policies`, `var/...`) stay relative to the
working directory. Secrets are never inline: the file names an environment variable (`*_env`)
or a file (`*_file`) that holds them.

`mcp-fhir config check FILE` runs `load`: the schema, then everything `serve` would need at
start (`check_runtime`): every named environment variable set, every file it opens readable
and well-formed (TLS pairs, CA bundles, private keys, the ID-map seed, the audit cipher key),
every folder it reads present, every folder it writes creatable, and an OPA binary found when
OPA is managed. `load(path, files=False)` (`config check --skip-files`, for a file written for
another machine) checks the schema and the environment variables only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import ssl
import subprocess
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.settings import AgentAuthSettings
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.ehr.profiles import get_profile
from mcp_fhir.ehr.smart import AdditionalKey, SmartSettings
from mcp_fhir.resilience.breaker import BreakerSettings
from mcp_fhir.resilience.cache import CacheSettings
from mcp_fhir.resilience.ratelimit import RateLimiterSettings
from mcp_fhir.tracing import TracingSettings

__all__ = [
    "DEFAULT_CONFIG_ENV",
    "DEFAULT_HTTP_PORT",
    "ActivitySettings",
    "BackendSettings",
    "ConfigErrors",
    "ConsentSettings",
    "IdMapSettings",
    "LimitsSettings",
    "OpaDeploymentSettings",
    "ServerSettings",
    "Settings",
    "breaker_settings",
    "check_environment",
    "check_runtime",
    "from_mapping",
    "load",
]

DEFAULT_HTTP_PORT = 8765
DEFAULT_CONFIG_ENV = "MCP_FHIR_CONFIG"
SECRET_KEYS = ("secret", "password", "token", "private_key", "api_key")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_RELATIVE = "relative"


class ConfigErrors(ConfigError):
    """Every error found in one configuration. `key` and `rule` are the first error's."""

    def __init__(self, errors: list[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = errors[0]
        super().__init__(first.key, first.rule)
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        if len(errors) > 1:
            self.message = "; ".join(f"{e.key}: {e.rule}" for e in errors)
            self.details["errors"] = [{"key": e.key, "rule": e.rule} for e in errors]

    def lines(self) -> list[str]:
        """One `[config_invalid] key: rule` line per error."""
        return [f"[{e.code}] {e.key}: {e.rule}" for e in self.errors]


def _fail(key: str, rule: str, *, relative: bool = False) -> PydanticCustomError:
    """A validation error that keeps its key (absolute, or relative to the field's parent)."""
    ctx: dict[str, Any] = {"key": key, "rule": rule}
    if relative:
        ctx[_RELATIVE] = True
    return PydanticCustomError("config", "{rule}", ctx)


def _from_config_error(exc: ConfigError, *, relative: bool = False) -> PydanticCustomError:
    return _fail(exc.key, exc.rule, relative=relative)


def _errors_of(exc: ValidationError) -> list[ConfigError]:
    """Every pydantic error as a `ConfigError` naming the key."""
    out: list[ConfigError] = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        loc = [p for p in err["loc"] if not str(p).startswith("function-")]
        if err["type"] == "config" and "key" in ctx:
            key = str(ctx["key"])
            if ctx.get(_RELATIVE):
                parent = _key_of(tuple(loc[:-1]))
                key = key if parent == "(root)" else f"{parent}.{key}"
            out.append(ConfigError(key, str(ctx["rule"])))
            continue
        rule = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            rule = "unknown key"
        out.append(ConfigError(_key_of(tuple(loc)), rule))
    return out


def _key_of(loc: tuple[Any, ...]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key or "(root)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """Validate, raising `ConfigErrors` (every error, by key) instead of pydantic's error."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ConfigErrors(_errors_of(exc)) from None


def _http_url(value: str | None) -> str | None:
    if value is None:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http or https URL with a host")
    return value.rstrip("/")


class ServerSettings(_Strict):
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_HTTP_PORT, ge=1, le=65535)
    path: str = Field("/mcp", pattern=r"^/[A-Za-z0-9/_\-]*$")
    public_url: str | None = Field(
        None, description="This server's canonical URI: the audience tokens must carry."
    )
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = Field(
        (), description="Host header values (host:port) clients use; required when host is 0.0.0.0 or ::."
    )
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    stateless: bool = False
    json_response: bool = Field(
        True,
        description="Answer each MCP POST with one JSON body instead of an SSE stream "
        "(the sidecar sends no notifications during a call).",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="The HTTP server's event loop; auto takes uvloop when it is installed."
    )
    http_parser: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="The HTTP/1.1 parser; auto takes httptools when it is installed."
    )
    metrics_port: int | None = Field(None, ge=1, le=65535)

    _v_public = field_validator("public_url")(lambda v: _http_url(v))

    @model_validator(mode="after")
    def _server_extras_installed(self) -> ServerSettings:
        for key, module in (("event_loop", "uvloop"), ("http_parser", "httptools")):
            if getattr(self, key) == module and importlib.util.find_spec(module) is None:
                raise _fail(f"server.{key}", f"{module} is not installed")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise _fail("server.tls_key_file", "tls_cert_file and tls_key_file go together")
        if self.transport == "http" and self.host in ("0.0.0.0", "::") and not self.allowed_hosts:  # noqa: S104
            raise _fail("server.allowed_hosts", "is required when server.host binds all interfaces")
        if self.metrics_port is not None and self.metrics_port == self.port and self.transport == "http":
            raise _fail("server.metrics_port", "must differ from server.port")
        return self

    @property
    def canonical_url(self) -> str:
        scheme = "https" if self.tls_cert_file else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}{self.path}"


class OpaDeploymentSettings(_Strict):
    """The `opa` section: where OPA runs (or how to start it) and how long a decision may take."""

    url: str | None = Field(None, description="OPA's base URL. Unset: start a managed OPA child.")
    binary: str | None = None
    policies: Path = Path("policies")
    decision_timeout: float = Field(0.5, gt=0, le=30)
    token_env: str | None = None
    expected_revision: str | None = None
    decision_log: Path | None = Path("var/opa-decisions.log")
    shadow_url: str | None = Field(
        None, description="A candidate policy's OPA, evaluated beside the active one."
    )
    shadow_policies: Path | None = Field(
        None, description="A candidate policies/ folder, run in a second managed OPA."
    )
    revision_from: Literal["status", "provenance"] = Field(
        "status",
        description="Where each decision's bundle revision comes from: OPA's status API (read at start and "
        "every revision_poll_s while decisions flow), or ?provenance=true on every decision.",
    )
    revision_poll_s: float = Field(5.0, gt=0, le=3600)
    decision_cache: bool = Field(
        False,
        description="Reuse a decision for the same input (request id and time aside) under the same bundle "
        "revision, for as long as the policy's decision.valid_for_s says. Off by default.",
    )
    decision_cache_max_entries: int = Field(10_000, ge=1, le=1_000_000)

    _v_url = field_validator("url", "shadow_url")(lambda v: _http_url(v))

    @model_validator(mode="after")
    def _one_shadow(self) -> OpaDeploymentSettings:
        if self.shadow_url is not None and self.shadow_policies is not None:
            raise _fail("opa.shadow_policies", "set shadow_url or shadow_policies, not both")
        return self


def _smart_section(value: Any, info: ValidationInfo) -> SmartSettings | None:
    """`backends.NAME.smart`, built once; keys are relative to the backend until it has a name."""
    if value is None or isinstance(value, SmartSettings):
        return value
    if not isinstance(value, Mapping):
        raise _fail("smart", "must be a mapping", relative=True)
    base_url = info.data.get("base_url")
    try:
        return SmartSettings.from_mapping({"fhir_base_url": base_url, **value}, prefix="smart")
    except ConfigError as exc:
        raise _from_config_error(exc, relative=True) from None
    except TypeError:
        raise _fail("smart", "has a value of the wrong type", relative=True) from None


def _dataclass_section(
    cls: type[Any],
    section: str,
    data: Mapping[str, Any],
    *,
    exclude: tuple[str, ...] = (),
    relative: bool = False,
) -> Any:
    """A dataclass settings section from its mapping: unknown keys, its own rules, wrong types, by key."""
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for key in data:
        if key not in known:
            raise _fail(f"{section}.{key}", "unknown key", relative=relative)
    try:
        return cls(**data)
    except ConfigError as exc:
        raise _from_config_error(exc, relative=relative) from None
    except (TypeError, AttributeError):
        raise _fail(section, "has a value of the wrong type", relative=relative) from None


def _breaker_section(value: Any) -> BreakerSettings | None:
    """`backends.NAME.breaker`, built once."""
    if value is None or isinstance(value, BreakerSettings):
        return value
    if not isinstance(value, Mapping):
        raise _fail("breaker", "must be a mapping", relative=True)
    built: BreakerSettings = _dataclass_section(BreakerSettings, "breaker", value, relative=True)
    return built


def breaker_settings(backend: str, raw: Mapping[str, Any]) -> BreakerSettings:
    """`backends.<backend>.breaker` from a mapping; a `ConfigError` names the full key."""
    try:
        return _breaker_section(raw) or BreakerSettings()
    except PydanticCustomError as exc:
        context = exc.context or {}
        raise ConfigError(f"backends.{backend}.{context['key']}", str(context["rule"])) from None


class BackendSettings(_Strict):
    base_url: str
    profile: Literal[
        "r4", "epic", "cerner", "stu3", "au_gp", "best_practice", "medical_director", "genie"
    ] = "r4"
    smart: Annotated[SmartSettings | None, PlainValidator(_smart_section)] = Field(
        None, description="SMART Backend Services (SmartSettings)."
    )
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    rate_limit_per_minute: int | None = Field(None, ge=1, le=100_000)
    connect_timeout: float = Field(3.0, gt=0, le=60)
    read_timeout: float = Field(15.0, gt=0, le=300)
    total_timeout: float = Field(
        30.0, gt=0, le=600, description="Seconds one EHR request may take in all, body included."
    )
    max_retry_after: float = Field(
        120.0, ge=0, le=300, description="The longest Retry-After (429 or 503) honoured, in seconds."
    )
    allow_stale: bool = False
    hl7v2_results_dir: Path | None = Field(
        None, description="A folder of ORU^R01 files completing Observation searches."
    )
    timezone: str | None = Field(
        None, description="The backend's local time zone (IANA), for HL7 v2 timestamps."
    )
    breaker: Annotated[BreakerSettings | None, PlainValidator(_breaker_section)] = Field(
        None,
        description="Circuit breaker (failure_threshold, cool_down_seconds, ...): BreakerSettings.",
    )

    _v_url = field_validator("base_url")(lambda v: _http_url(v))

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError("must be an IANA time zone name, such as Australia/Brisbane") from None
        return v

    @model_validator(mode="after")
    def _tls_for_remote(self) -> BackendSettings:
        host = urlsplit(self.base_url).hostname or ""
        if self.base_url.startswith("http://") and host not in LOOPBACK:
            raise ValueError("base_url must use https unless it is on this machine")
        return self


class IdMapSettings(_Strict):
    kind: Literal["sqlite", "postgres", "identity"] = "sqlite"
    path: Path = Path("var/idmap.db")
    dsn_env: str | None = None
    seed_file: Path | None = None

    @model_validator(mode="after")
    def _dsn(self) -> IdMapSettings:
        if self.kind == "postgres" and not self.dsn_env:
            raise _fail("idmap.dsn_env", "required when idmap.kind is postgres")
        return self


class ConsentSettings(_Strict):
    """Patient consent in every decision (issue #21 §1); off by default.

    `source: ehr` reads the EHR's Consent resources under the SMART scope it then requests
    (`system/Consent.rs`, or `.read` in v1 syntax); `sqlite` (the default store, at `path`) or
    `postgres` (`dsn_env`, `table`) read the local store.
    """

    enabled: bool = False
    source: Literal["ehr", "sqlite", "postgres"] = "sqlite"
    path: Path = Path("var/consent.db")
    dsn_env: str | None = None
    table: str = Field("mcp_fhir_consent", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    ttl_seconds: float = Field(60.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _dsn(self) -> ConsentSettings:
        if self.enabled and self.source == "postgres" and not self.dsn_env:
            raise _fail("consent.dsn_env", "required when consent.source is postgres")
        return self


class ActivitySettings(_Strict):
    """Per-subject sliding-window counters passed to the policy (issue #21 §3); off by default."""

    enabled: bool = False
    store: Literal["memory", "redis"] = "memory"
    redis_url_env: str | None = None
    # Replicas that share counters must hash patient ids with one key: an env var holding it.
    patient_key_env: str | None = None
    key_prefix: str = Field("mcp-fhir:activity", min_length=1, max_length=100)
    windows: tuple[int, ...] = Field((60, 600), min_length=1, max_length=8)

    @field_validator("windows")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w <= 0 or w > 86400 for w in v):
            raise ValueError("every window must be between 1 and 86400 seconds")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _redis(self) -> ActivitySettings:
        if self.enabled and self.store == "redis" and not self.redis_url_env:
            raise _fail("activity.redis_url_env", "required when activity.store is redis")
        if self.enabled and self.store == "redis" and not self.patient_key_env:
            raise _fail("activity.patient_key_env", "required when activity.store is redis")
        return self


class LimitsSettings(_Strict):
    default_page_size: int = Field(20, ge=1, le=100)
    max_page_size: int = Field(100, ge=1, le=200)
    max_range_days: int = Field(3660, ge=1, le=36600)
    max_note_chars: int = Field(20_000, ge=100, le=1_000_000)

    @model_validator(mode="after")
    def _pages(self) -> LimitsSettings:
        if self.default_page_size > self.max_page_size:
            raise _fail("limits.default_page_size", "must not exceed limits.max_page_size")
        return self


def _mapping(section: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(section, "must be a mapping")
    return value


_T = TypeVar("_T")


def _auth_section(value: Any, info: ValidationInfo) -> AgentAuthSettings:
    """`auth`, built once; the audience defaults to the server's canonical URI."""
    if isinstance(value, AgentAuthSettings):
        return value
    data = dict(_mapping("auth", value))
    server = info.data.get("server")
    if data.get("issuer") and "audience" not in data and "resource_server_url" not in data:
        if server is None:
            raise _fail("auth.audience", "cannot default to server's URL while the server section is invalid")
        data["audience"] = server.canonical_url
    return _from_mapping("auth", AgentAuthSettings.from_mapping, data)


def _from_mapping(key: str, build: Callable[[Mapping[str, Any]], _T], data: Mapping[str, Any]) -> _T:
    """A section built by its own `from_mapping`, its errors named by their key under `key`."""
    try:
        return build(data)
    except ConfigError as exc:
        raise _from_config_error(exc) from None
    except TypeError:
        raise _fail(key, "has a value of the wrong type") from None


def _audit_section(value: Any) -> AuditSettings:
    if isinstance(value, AuditSettings):
        return value
    return _from_mapping("audit", AuditSettings.from_mapping, _mapping("audit", value))


def _cache_section(value: Any) -> CacheSettings | None:
    """`cache`, built once; None when `enabled: false` (the other keys are still checked)."""
    if value is None or isinstance(value, CacheSettings):
        return value
    data = dict(_mapping("cache", value))
    enabled = data.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("cache.enabled", "must be true or false")
    built: CacheSettings = _dataclass_section(CacheSettings, "cache", data)
    return built if enabled else None


def _tracing_section(value: Any) -> TracingSettings:
    if isinstance(value, TracingSettings):
        return value
    return _from_mapping("tracing", TracingSettings.from_mapping, _mapping("tracing", value))


def _rate_limit_section(value: Any) -> RateLimiterSettings:
    """`rate_limit` without its limits, which come from the backends (`Settings._backend_limits`)."""
    if isinstance(value, RateLimiterSettings):
        return value
    built: RateLimiterSettings = _dataclass_section(
        RateLimiterSettings, "rate_limit", _mapping("rate_limit", value), exclude=("limits",)
    )
    return built


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    auth: Annotated[AgentAuthSettings, PlainValidator(_auth_section)] = Field(
        default_factory=AgentAuthSettings, description="AgentAuthSettings."
    )
    opa: OpaDeploymentSettings = OpaDeploymentSettings()
    backends: dict[str, BackendSettings] = Field(min_length=1)
    default_backend: str | None = None
    tools: tuple[str, ...] = tuple(CATALOGUE)
    idmap: IdMapSettings = Field(default_factory=IdMapSettings)
    audit: Annotated[AuditSettings, PlainValidator(_audit_section)] = Field(
        default_factory=AuditSettings, description="AuditSettings."
    )
    cache: Annotated[CacheSettings | None, PlainValidator(_cache_section)] = Field(
        default_factory=CacheSettings, description="CacheSettings; None when cache.enabled is false."
    )
    rate_limit: Annotated[RateLimiterSettings, PlainValidator(_rate_limit_section)] = Field(
        default_factory=RateLimiterSettings,
        description="store (memory|redis), redis_url_env, max_wait_seconds; limits per backend.",
    )
    limits: LimitsSettings = LimitsSettings()
    flag_prompt_injection: bool = True
    consent: ConsentSettings = ConsentSettings()
    activity: ActivitySettings = ActivitySettings()
    tracing: Annotated[TracingSettings, PlainValidator(_tracing_section)] = Field(
        default_factory=TracingSettings, description="TracingSettings: OpenTelemetry traces, off by default."
    )

    @field_validator("backends")
    @classmethod
    def _names(cls, v: dict[str, BackendSettings]) -> dict[str, BackendSettings]:
        named: dict[str, BackendSettings] = {}
        for name, backend in v.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"backend name {name!r} may hold only letters, digits, - and _")
            if backend.smart is not None:  # the smart settings learn their full key prefix
                smart = dataclasses.replace(backend.smart, prefix=f"backends.{name}.smart")
                backend = backend.model_copy(update={"smart": smart})
            named[name] = backend
        return named

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(CATALOGUE))
        if unknown:
            raise ValueError("unknown tools: " + ", ".join(unknown))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_backend is not None and self.default_backend not in self.backends:
            raise _fail("default_backend", "must name one of backends")
        return self

    @model_validator(mode="after")
    def _backend_limits(self) -> Settings:
        """Per-backend limits come from `backends.<name>.rate_limit_per_minute` or the profile's default."""
        limits = {}
        for name, backend in self.backends.items():
            per_minute = (
                backend.rate_limit_per_minute or get_profile(backend.profile).default_rate_limit_per_minute
            )
            if per_minute:
                limits[name] = {"requests_per_minute": float(per_minute)}
        if limits.keys() != self.rate_limit.limits.keys():
            try:
                built = dataclasses.replace(self.rate_limit, limits=limits)
            except ConfigError as exc:
                raise _from_config_error(exc) from None
            object.__setattr__(self, "rate_limit", built)
        return self

    # The call path's accessors: each returns the section built at load, never a rebuilt one.

    def agent_auth(self) -> AgentAuthSettings:
        """The `auth` section (the audience defaulted to the canonical URI)."""
        return self.auth

    def audit_settings(self) -> AuditSettings:
        return self.audit

    @property
    def cache_enabled(self) -> bool:
        return self.cache is not None

    def cache_settings(self) -> CacheSettings:
        return self.cache if self.cache is not None else CacheSettings()

    def smart_settings(self, name: str) -> SmartSettings | None:
        return self.backends[name].smart

    def rate_limit_settings(self) -> RateLimiterSettings:
        return self.rate_limit

    def check_sections(self) -> None:
        """The rules that span sections. Raises `ConfigErrors` with every one that fails."""
        errors = []
        if self.server.transport == "stdio" and self.auth.local is None:
            errors.append(ConfigError("auth.local", "transport stdio needs the local agent's identity"))
        if self.server.transport == "http" and not (self.auth.accepts_jwt or self.auth.api_keys):
            errors.append(ConfigError("auth", "the HTTP transport needs auth.issuer or auth.api_keys"))
        if errors:
            raise ConfigErrors(errors)

    @property
    def backend_name(self) -> str:
        return self.default_backend or next(iter(self.backends))


# ---- relative paths ------------------------------------------------------------------------------

# Where the file may name a path, as (section path, key); `*` matches any backend name or list item.
_PATH_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("server",), "tls_cert_file"),
    (("server",), "tls_key_file"),
    (("opa",), "binary"),
    (("opa",), "policies"),
    (("opa",), "decision_log"),
    (("opa",), "shadow_policies"),
    *((("backends", "*"), k) for k in ("ca_bundle", "client_cert", "client_key", "hl7v2_results_dir")),
    *(
        (("backends", "*", "smart"), k)
        for k in ("private_key_file", "client_secret_file", "ca_bundle", "client_cert", "client_key")
    ),
    (("backends", "*", "smart", "additional_keys", "*"), "private_key_file"),
    (("idmap",), "path"),
    (("idmap",), "seed_file"),
    (("consent",), "path"),
    (("audit",), "path"),
    (("audit",), "signing_key_file"),
    (("audit",), "encryption_key_file"),
    (("audit",), "public_key_files"),  # a list: each path resolved
    (("audit",), "witness_path"),
    (("audit",), "writer_state_dir"),
)


def _nodes(node: Any, where: tuple[str, ...]) -> Iterator[Any]:
    if not where:
        yield node
        return
    head, rest = where[0], where[1:]
    if head == "*":
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            yield from _nodes(child, rest)
    elif isinstance(node, dict) and head in node:
        yield from _nodes(node[head], rest)


def resolve_paths(data: Any, base: Path) -> Any:
    """The parsed file with every relative path it names made absolute against `base` (in place)."""
    if not isinstance(data, dict):
        return data
    for where, key in _PATH_KEYS:
        for node in _nodes(data, where):
            if not isinstance(node, dict):
                continue
            if key not in node:
                continue
            value = node[key]
            if isinstance(value, list):
                node[key] = [_resolved(v, base) for v in value]
                continue
            if key == "binary" and isinstance(value, str) and "/" not in value:
                continue  # a bare name is looked up on $PATH
            node[key] = _resolved(value, base)
    return data


def _resolved(value: Any, base: Path) -> Any:
    """A relative path string made absolute against `base`; anything else as it was."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    return os.path.normpath(base / value)


# ---- from a mapping -------------------------------------------------------------------------------


def _find_inline_secrets(node: Any, path: str = "") -> list[str]:
    """Secrets are never inline: any key that names a secret must end in _env or _file."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            lowered = str(key).lower()
            if (
                any(s in lowered for s in SECRET_KEYS)
                and not lowered.endswith(("_env", "_file"))
                and isinstance(value, str)
                and lowered not in ("token_url",)
            ):
                found.append(where)
                continue
            found += _find_inline_secrets(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _find_inline_secrets(item, f"{path}[{i}]")
    return found


def _merge(errors: list[ConfigError]) -> list[ConfigError]:
    """One error per key, the first found."""
    seen: set[str] = set()
    out = []
    for error in errors:
        if error.key not in seen:
            seen.add(error.key)
            out.append(error)
    return out


def from_mapping(data: Any, *, base_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Validate a parsed config. Raises `ConfigErrors` naming every bad key.

    With `base_dir`, relative paths in `data` are resolved against it first.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigErrors([ConfigError("(root)", "the configuration must be a mapping")])
    if base_dir is not None:
        data = resolve_paths(data, Path(base_dir))
    errors = [
        ConfigError(key, "secrets may not be inline: name an environment variable (_env) or a file (_file)")
        for key in _find_inline_secrets(data)
    ]
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ConfigErrors as exc:
        errors += exc.errors
    if settings is not None:
        try:
            settings.check_sections()
        except ConfigErrors as exc:
            errors += exc.errors
    if errors or settings is None:
        raise ConfigErrors(_merge(errors))
    return settings


# ---- what serve needs at start ------------------------------------------------------------------


def _settings_tree(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key path, value) in a settings object, through its models, dataclasses, dicts and lists."""
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _settings_tree(getattr(node, name), f"{path}.{name}" if path else name)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            if f.name not in ("prefix", "key_prefix"):
                yield from _settings_tree(getattr(node, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _settings_tree(value, f"{path}.{key}")
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            yield from _settings_tree(item, f"{path}[{i}]")
    else:
        yield path, node


def _env_errors(settings: Settings, env: Mapping[str, str]) -> list[ConfigError]:
    return [
        ConfigError(key, f"environment variable {value} is not set")
        for key, value in _settings_tree(settings)
        if key.endswith("_env") and isinstance(value, str) and value and not env.get(value)
    ]


def check_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Every secret the file names by environment variable (`*_env`) must be set now, not at first use."""
    errors = _env_errors(settings, os.environ if environ is None else environ)
    if errors:
        raise ConfigErrors(errors)


def _readable_file(key: str, path: Path | str | None) -> ConfigError | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return ConfigError(key, f"{p} is not a file")
    if not os.access(p, os.R_OK):
        return ConfigError(key, f"{p} is not readable")
    return None


def _folder(key: str, path: Path | str | None) -> ConfigError | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        return ConfigError(key, f"{p} is not a folder")
    if not os.access(p, os.R_OK | os.X_OK):
        return ConfigError(key, f"{p} is not readable")
    return None


def _creatable(key: str, path: Path | str | None) -> ConfigError | None:
    """A file `serve` will create or append to: itself writable, or its nearest existing folder."""
    if path is None:
        return None
    p = Path(path).absolute()
    if p.exists():
        if p.is_dir():
            return ConfigError(key, f"{p} is a folder, not a file")
        return None if os.access(p, os.W_OK) else ConfigError(key, f"{p} is not writable")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return ConfigError(key, f"{p} cannot be created: {parent} is not a writable folder")
    return None


def _attempt(key: str, check: Callable[[], object]) -> ConfigError | None:
    """Run a loader `serve` runs; its `ConfigError` (or any I/O or format error) names `key`."""
    try:
        check()
    except ConfigError as exc:
        return exc
    except (OSError, ValueError, TypeError, ssl.SSLError) as exc:
        return ConfigError(key, f"cannot be loaded ({type(exc).__name__})")
    return None


OPA_CHECK_TIMEOUT = 60.0  # seconds; `opa check` of this project's policies takes well under one


def _compiles(binary: list[str], key: str, policies: Path) -> ConfigError | None:
    """The policies compile, as the managed OPA will load them (`opa check`, tests and fixtures ignored)."""
    if not binary:
        return None  # no OPA binary: reported once, under opa.binary
    command = [binary[0], "check", "--ignore", "*_test.rego", "--ignore", "fixtures", str(policies)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=OPA_CHECK_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ConfigError(key, f"opa check could not run ({type(exc).__name__})")
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        first = next((ln for ln in output.splitlines() if "error" in ln), "")
        detail = first.strip()[:200] or "see `opa check`"
        return ConfigError(key, f"the policies do not compile: {detail}")
    return None


def _smart_errors(smart: SmartSettings, env: Mapping[str, str]) -> list[ConfigError | None]:
    from mcp_fhir._secret import secret_from_file
    from mcp_fhir.ehr.keys import load_signing_key
    from mcp_fhir.ehr.tls import build_ssl_context

    p = smart.prefix
    out: list[ConfigError | None] = []
    if smart.client_secret_file:
        out.append(
            _attempt(
                f"{p}.client_secret_file",
                lambda: secret_from_file(smart.client_secret_file or "", f"{p}.client_secret_file"),
            )
        )
    keys: list[tuple[str, AdditionalKey | SmartSettings]] = []
    if smart.auth_method != "client_secret_basic":
        keys.append((p, smart))
    keys += [(f"{p}.additional_keys[{i}]", k) for i, k in enumerate(smart.additional_keys)]
    for key, item in keys:
        if item.private_key_env and not env.get(item.private_key_env):
            continue  # reported once, as an unset variable
        kid = item.key_id or ""
        out.append(
            _attempt(
                key,
                partial(
                    load_signing_key,
                    file=item.private_key_file,
                    env=item.private_key_env,
                    kid=kid,
                    algorithm=item.algorithm,
                    key=key,
                    environ=env,
                ),
            )
        )
    if smart.ca_bundle or smart.client_cert:
        out.append(
            _attempt(
                p, lambda: build_ssl_context(smart.ca_bundle, smart.client_cert, smart.client_key, prefix=p)
            )
        )
    return out


def check_runtime(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Everything `serve` needs at start, beyond the schema. Raises `ConfigErrors` with every failure."""
    from mcp_fhir.audit.crypto import decode_aes_key
    from mcp_fhir.ehr.idmap import load_idmap_yaml
    from mcp_fhir.ehr.tls import build_ssl_context
    from mcp_fhir.policy.managed_opa import find_opa

    env = os.environ if environ is None else environ
    errors: list[ConfigError | None] = list(_env_errors(settings, env))
    server = settings.server
    if server.tls_cert_file is not None and server.tls_key_file is not None:
        cert, key = server.tls_cert_file, server.tls_key_file
        present = [_readable_file("server.tls_cert_file", cert), _readable_file("server.tls_key_file", key)]
        errors += present
        if not any(present):
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            errors.append(_attempt("server.tls_cert_file", lambda: context.load_cert_chain(cert, key)))
    opa = settings.opa
    binary: list[str] = []
    if opa.url is None or opa.shadow_policies is not None:  # a managed OPA is started
        errors.append(_attempt("opa.binary", lambda: binary.append(find_opa(opa.binary))))
    if opa.url is None:
        errors.append(
            _folder("opa.policies", opa.policies) or _compiles(binary, "opa.policies", opa.policies)
        )
        errors.append(_creatable("opa.decision_log", opa.decision_log))
    if opa.shadow_policies is not None:
        shadow = opa.shadow_policies
        errors.append(
            _folder("opa.shadow_policies", shadow) or _compiles(binary, "opa.shadow_policies", shadow)
        )
    for name, backend in settings.backends.items():
        prefix = f"backends.{name}"
        for field_name in ("ca_bundle", "client_cert", "client_key"):
            errors.append(_readable_file(f"{prefix}.{field_name}", getattr(backend, field_name)))
        if backend.ca_bundle or backend.client_cert:
            errors.append(
                _attempt(
                    prefix,
                    partial(
                        build_ssl_context,
                        backend.ca_bundle,
                        backend.client_cert,
                        backend.client_key,
                        prefix=prefix,
                    ),
                )
            )
        errors.append(_folder(f"{prefix}.hl7v2_results_dir", backend.hl7v2_results_dir))
        if backend.smart is not None:
            errors += _smart_errors(backend.smart, env)
    idmap = settings.idmap
    if idmap.kind == "sqlite":
        errors.append(_creatable("idmap.path", idmap.path))
    if idmap.seed_file is not None:
        seed = idmap.seed_file
        problem = _readable_file("idmap.seed_file", seed) or _attempt(
            "idmap.seed_file", lambda: load_idmap_yaml(seed)
        )
        if problem is not None and problem.key.startswith("idmap.seed") and problem.key != "idmap.seed_file":
            problem = ConfigError("idmap.seed_file" + problem.key.removeprefix("idmap.seed"), problem.rule)
        errors.append(problem)
    if settings.consent.enabled and settings.consent.source == "sqlite":
        errors.append(_creatable("consent.path", settings.consent.path))
    audit = settings.audit
    if audit.sink in ("file", "sqlite"):
        errors.append(_creatable("audit.path", audit.path))
    if not audit.signing_key_env:
        signing = audit.signing_key_path
        errors.append(
            _readable_file("audit.signing_key_file", signing)
            if signing.exists()
            else _creatable("audit.signing_key_file", signing)
        )
    if audit.encryption_key_file:
        errors.append(
            _attempt(
                "audit.encryption_key_file",
                lambda: decode_aes_key(Path(str(audit.encryption_key_file)).read_text(encoding="utf-8")),
            )
        )
    elif audit.encryption_key_env and env.get(audit.encryption_key_env):
        errors.append(
            _attempt("audit.encryption_key_env", lambda: decode_aes_key(env[audit.encryption_key_env or ""]))
        )
    found: list[ConfigError] = [e for e in errors if e is not None]
    if found:
        raise ConfigErrors(_merge(found))


# ---- from a file ----------------------------------------------------------------------------------


def load(path: str | os.PathLike[str] | None = None, *, files: bool = True) -> Settings:
    """Load and validate the YAML file at `path` (or $MCP_FHIR_CONFIG).

    Relative paths in the file are resolved against the file's folder. Every environment
    variable the file names must be set. With `files` (the default), everything else `serve`
    needs at start is checked too (`check_runtime`): files, folders, keys, the OPA binary.
    """
    path = path or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        raise ConfigErrors(
            [ConfigError("--config", f"no configuration file given (use --config or ${DEFAULT_CONFIG_ENV})")]
        )
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigErrors([ConfigError("--config", f"cannot read {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigErrors([ConfigError("(root)", "the file is not UTF-8 text")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigErrors([ConfigError("(root)", f"not valid YAML{where}")]) from None
    settings = from_mapping(data, base_dir=file.absolute().parent)
    if files:
        check_runtime(settings)
    else:
        check_environment(settings)
    return settings
