"""One validated settings model, loaded from a YAML file and the environment.

Every error names the key and the rule (`backends.epic.base_url: must be an https URL`).
Secrets are never inline: the file names an environment variable (`*_env`) or a file
(`*_file`) that holds them. `mcp-fhir config check FILE` runs this and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.settings import AgentAuthSettings
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.catalog import CATALOGUE
from mcp_fhir.ehr.profiles import get_profile
from mcp_fhir.ehr.smart import SmartSettings
from mcp_fhir.resilience.cache import CacheSettings
from mcp_fhir.resilience.ratelimit import RateLimiterSettings

DEFAULT_HTTP_PORT = 8765
DEFAULT_CONFIG_ENV = "MCP_FHIR_CONFIG"
SECRET_KEYS = ("secret", "password", "token", "private_key", "api_key")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str | None, *, https_only: bool = False) -> str | None:
    if value is None:
        return value
    parts = urlsplit(value)
    allowed = ("https",) if https_only else ("http", "https")
    if parts.scheme not in allowed or not parts.hostname:
        raise ValueError("must be an " + " or ".join(allowed) + " URL with a host")
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
                raise ConfigError(f"server.{key}", f"{module} is not installed")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("server.tls_key_file", "tls_cert_file and tls_key_file go together")
        if self.transport == "http" and self.host in ("0.0.0.0", "::") and not self.allowed_hosts:  # noqa: S104
            raise ConfigError("server.allowed_hosts", "is required when server.host binds all interfaces")
        if self.metrics_port is not None and self.metrics_port == self.port and self.transport == "http":
            raise ConfigError("server.metrics_port", "must differ from server.port")
        return self

    @property
    def canonical_url(self) -> str:
        scheme = "https" if self.tls_cert_file else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}{self.path}"


class OpaConfig(_Strict):
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

    _v_url = field_validator("url", "shadow_url")(lambda v: _http_url(v))

    @model_validator(mode="after")
    def _one_shadow(self) -> OpaConfig:
        if self.shadow_url is not None and self.shadow_policies is not None:
            raise ConfigError("opa.shadow_policies", "set shadow_url or shadow_policies, not both")
        return self


class BackendConfig(_Strict):
    base_url: str
    profile: Literal[
        "r4", "epic", "cerner", "stu3", "au_gp", "best_practice", "medical_director", "genie"
    ] = "r4"
    smart: dict[str, Any] | None = Field(
        None, description="SMART Backend Services; validated by SmartSettings."
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
    breaker: dict[str, Any] | None = Field(
        None,
        description="Circuit breaker (failure_threshold, cool_down_seconds, ...); validated by BreakerSettings.",
    )

    _v_url = field_validator("base_url")(lambda v: _http_url(v))

    @model_validator(mode="after")
    def _tls_for_remote(self) -> BackendConfig:
        host = urlsplit(self.base_url).hostname or ""
        if self.base_url.startswith("http://") and host not in LOOPBACK:
            raise ValueError("base_url must use https unless it is on this machine")
        return self


class IdMapConfig(_Strict):
    kind: Literal["sqlite", "postgres", "identity"] = "sqlite"
    path: Path = Path("var/idmap.db")
    dsn_env: str | None = None
    seed_file: Path | None = None

    @model_validator(mode="after")
    def _dsn(self) -> IdMapConfig:
        if self.kind == "postgres" and not self.dsn_env:
            raise ConfigError("idmap.dsn_env", "required when idmap.kind is postgres")
        return self


class LimitsConfig(_Strict):
    default_page_size: int = Field(20, ge=1, le=100)
    max_page_size: int = Field(100, ge=1, le=200)
    max_range_days: int = Field(3660, ge=1, le=36600)
    max_note_chars: int = Field(20_000, ge=100, le=1_000_000)

    @model_validator(mode="after")
    def _pages(self) -> LimitsConfig:
        if self.default_page_size > self.max_page_size:
            raise ConfigError("limits.default_page_size", "must not exceed limits.max_page_size")
        return self


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    auth: dict[str, Any] = Field(default_factory=dict, description="Validated by AgentAuthSettings.")
    opa: OpaConfig = OpaConfig()
    backends: dict[str, BackendConfig] = Field(min_length=1)
    default_backend: str | None = None
    tools: tuple[str, ...] = tuple(CATALOGUE)
    idmap: IdMapConfig = Field(default_factory=IdMapConfig)
    audit: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    rate_limit: dict[str, Any] = Field(
        default_factory=dict,
        description="store (memory|redis), redis_url_env, max_wait_seconds; limits per backend.",
    )
    limits: LimitsConfig = LimitsConfig()
    flag_prompt_injection: bool = True

    @field_validator("backends")
    @classmethod
    def _names(cls, v: dict[str, BackendConfig]) -> dict[str, BackendConfig]:
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"backend name {name!r} may hold only letters, digits, - and _")
        return v

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
            raise ConfigError("default_backend", "must name one of backends")
        return self

    def agent_auth(self) -> AgentAuthSettings:
        """The `auth` section, validated by its owner; the audience defaults to the canonical URI."""
        data = dict(self.auth)
        if data.get("issuer") and "audience" not in data and "resource_server_url" not in data:
            data["audience"] = self.server.canonical_url
        return AgentAuthSettings.from_mapping(data)

    def audit_settings(self) -> AuditSettings:
        return AuditSettings.from_mapping(self.audit)

    @property
    def cache_enabled(self) -> bool:
        return bool(self.cache.get("enabled", True))

    def cache_settings(self) -> CacheSettings:
        data = {k: v for k, v in self.cache.items() if k != "enabled"}
        known = {f.name for f in dataclasses.fields(CacheSettings)}
        for key in data:
            if key not in known:
                raise ConfigError(f"cache.{key}", "unknown key")
        return CacheSettings(**data)

    def smart_settings(self, name: str) -> SmartSettings | None:
        backend = self.backends[name]
        if backend.smart is None:
            return None
        raw = {"fhir_base_url": backend.base_url, **backend.smart}
        return SmartSettings.from_mapping(raw, prefix=f"backends.{name}.smart")

    def rate_limit_settings(self) -> RateLimiterSettings:
        """Per-backend limits come from `backends.<name>.rate_limit_per_minute` or the profile's default."""
        data = dict(self.rate_limit)
        known = {f.name for f in dataclasses.fields(RateLimiterSettings)} - {"limits"}
        for key in data:
            if key not in known:
                raise ConfigError(f"rate_limit.{key}", "unknown key")
        limits = {}
        for name, backend in self.backends.items():
            per_minute = (
                backend.rate_limit_per_minute or get_profile(backend.profile).default_rate_limit_per_minute
            )
            if per_minute:
                limits[name] = {"requests_per_minute": float(per_minute)}
        return RateLimiterSettings(limits=limits, **data)

    def check_sections(self) -> None:
        """Validate the sections other modules own, and the rules that span sections."""
        for name in self.backends:
            self.smart_settings(name)
        auth = self.agent_auth()
        self.audit_settings()
        self.cache_settings()
        self.rate_limit_settings()
        if self.server.transport == "stdio" and auth.local is None:
            raise ConfigError("auth.local", "transport stdio needs the local agent's identity")
        if self.server.transport == "http" and not (auth.accepts_jwt or auth.api_keys):
            raise ConfigError("auth", "the HTTP transport needs auth.issuer or auth.api_keys")

    @property
    def backend_name(self) -> str:
        return self.default_backend or next(iter(self.backends))


def _find_inline_secrets(node: Any, path: str = "") -> str | None:
    """Secrets are never inline: any key that names a secret must end in _env or _file."""
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
                return where
            found = _find_inline_secrets(value, where)
            if found:
                return found
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found = _find_inline_secrets(item, f"{path}[{i}]")
            if found:
                return found
    return None


def _key_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts) or "(root)"


def from_mapping(data: Any) -> Settings:
    """Validate a parsed config. Raises `ConfigError` naming the first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(root)", "the configuration must be a mapping")
    secret = _find_inline_secrets(data)
    if secret:
        raise ConfigError(
            secret, "secrets may not be inline: name an environment variable (_env) or a file (_file)"
        )
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        rule = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            rule = "unknown key"
        raise ConfigError(_key_of(err["loc"]), rule) from None
    settings.check_sections()
    return settings


def _env_references(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every `*_env` key with a value in a (dumped) settings tree, as (key path, variable name)."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).endswith("_env") and isinstance(value, str) and value:
                found.append((where, value))
            else:
                found += _env_references(value, where)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            found += _env_references(item, f"{path}[{i}]")
    return found


def check_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Every secret the file names by environment variable (`*_env`) must be set now, not at first use."""
    env = os.environ if environ is None else environ
    for key, name in _env_references(settings.model_dump(mode="python")):
        if not env.get(name):
            raise ConfigError(key, f"environment variable {name} is not set")


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate the YAML file at `path` (or $MCP_FHIR_CONFIG)."""
    path = path or os.environ.get(DEFAULT_CONFIG_ENV)
    if not path:
        raise ConfigError("--config", f"no configuration file given (use --config or ${DEFAULT_CONFIG_ENV})")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("(root)", f"not valid YAML{where}") from None
    settings = from_mapping(data)
    check_environment(settings)
    return settings
