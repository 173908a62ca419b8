"""Assemble each configured backend: profile, SMART credentials, TLS, pooled HTTP, and resilience.

Least privilege starts here: the token request asks only for the scopes the enabled tools
need, and tools whose scopes the EHR did not grant are reported unavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

from mcp_fhir._exceptions import (
    MCPFhirError,
)
from mcp_fhir.catalog import CATALOGUE, LOCAL_TYPES
from mcp_fhir.config import IdMapSettings, Settings, breaker_settings
from mcp_fhir.ehr.client import FhirEHRClient
from mcp_fhir.ehr.hl7_results import Hl7ResultsSource
from mcp_fhir.ehr.idmap import PostgresIdMap, SqliteIdMap, load_idmap_yaml, seed_idmap
from mcp_fhir.ehr.profiles import detect_fhir_version, get_profile
from mcp_fhir.ehr.scopes import required_scopes, unavailable_tools
from mcp_fhir.ehr.smart import SmartBackendAuth, SmartSettings
from mcp_fhir.ehr.smart import build_http_client as build_token_http_client
from mcp_fhir.ehr.tls import build_ssl_context
from mcp_fhir.ehr.transport import build_http_client
from mcp_fhir.resilience.breaker import BreakerSettings, CircuitBreaker
from mcp_fhir.resilience.cache import Cache
from mcp_fhir.resilience.guard import BackendGuard
from mcp_fhir.resilience.ratelimit import RateLimiter

log = logging.getLogger("mcp_fhir.ehr")


def _normaliser(profile_name: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    profile = get_profile(profile_name)
    if profile.name == "r4":
        return None

    def normalise(resource: dict[str, Any]) -> dict[str, Any]:
        out = profile.normalise(resource)
        resource = out.resource
        if out.extras:
            resource = {**resource, "_normalised": out.extras}
        if out.unmapped:
            resource = {**resource, "_unmapped": out.unmapped}
        return resource

    return normalise


def breaker_for(backend: str, raw: BreakerSettings | Mapping[str, Any] | None) -> CircuitBreaker:
    """The backend's circuit breaker, from its `breaker` settings (defaults when absent)."""
    if raw is None or isinstance(raw, BreakerSettings):
        return CircuitBreaker(backend, raw or BreakerSettings())
    return CircuitBreaker(backend, breaker_settings(backend, raw))


async def _smart(
    stack: AsyncExitStack,
    name: str,
    smart_settings: SmartSettings | None,
    tools: tuple[str, ...],
    max_retry_after: float,
) -> tuple[SmartBackendAuth | None, dict[str, tuple[str, ...]]]:
    if smart_settings is None:
        return None, {}
    syntax: Any = smart_settings.scope_syntax
    ehr_tools = [t for t in tools if not set(CATALOGUE[t][1]) <= LOCAL_TYPES]
    scopes = required_scopes(ehr_tools, syntax=syntax, catalogue=CATALOGUE)
    http = build_token_http_client(smart_settings)
    stack.push_async_callback(http.aclose)
    auth = SmartBackendAuth(
        smart_settings, backend=name, scopes=scopes, http_client=http, max_retry_after=max_retry_after
    )
    try:
        await auth.token()
    except MCPFhirError as exc:
        log.warning("backend %s: no token at start (%s); tools will report it per call", name, exc.code)
        return auth, {}
    missing = unavailable_tools(ehr_tools, auth.granted_scopes, syntax, CATALOGUE)
    return auth, {tool: tuple(scopes) for tool, scopes in missing.items()}


async def _detect_version(name: str, client: FhirEHRClient, profile: str) -> None:
    """Read `/metadata`; a generic `r4` backend that turns out to speak STU3 gets the STU3 normaliser."""
    try:
        version = detect_fhir_version(await client.capability_statement())
    except MCPFhirError as exc:
        log.warning("backend %s: FHIR version not detected (%s); using profile %s", name, exc.code, profile)
        return
    if profile == "r4" and version.startswith("3."):
        client.set_normaliser(_normaliser("stu3"), fhir_version=version)
        log.warning("backend %s speaks FHIR %s: normalising STU3 to R4", name, version)
    else:
        client.fhir_version = version


async def open_backends(
    stack: AsyncExitStack, settings: Settings
) -> tuple[dict[str, FhirEHRClient], dict[str, tuple[str, ...]]]:
    """Open every backend's clients (closed by `stack`). Returns the clients and the unavailable tools."""
    cache = Cache.from_settings(settings.cache_settings()) if settings.cache_enabled else None
    if cache is not None:
        stack.push_async_callback(cache.aclose)
    # Memory, or Redis to hold one limit across replicas. Every backend has a schedule in it, limited or
    # not, so that one backend's 429 (or 503 with Retry-After) holds every call to that backend.
    limiter = RateLimiter.from_settings(settings.rate_limit_settings())
    stack.push_async_callback(limiter.aclose)
    clients: dict[str, FhirEHRClient] = {}
    unavailable: dict[str, tuple[str, ...]] = {}
    for name, cfg in settings.backends.items():
        ssl_ctx = build_ssl_context(cfg.ca_bundle, cfg.client_cert, cfg.client_key, prefix=f"backends.{name}")
        http = build_http_client(
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            total_timeout=cfg.total_timeout,
            ssl_context=ssl_ctx,
        )
        tokens, missing = await _smart(
            stack, name, settings.smart_settings(name), settings.tools, cfg.max_retry_after
        )
        profile = get_profile(cfg.profile)
        unavailable.update(missing)
        client = FhirEHRClient(
            name,
            cfg.base_url,
            http=http,
            token_provider=tokens,
            normalise=_normaliser(cfg.profile),
            guard=BackendGuard(
                name,
                limiter=limiter,
                breaker=breaker_for(name, cfg.breaker),
                max_retry_after=cfg.max_retry_after,
            ),
            cache=cache,
            allow_stale=cfg.allow_stale,
            check_query=profile.check_query,
            hl7_results=Hl7ResultsSource(cfg.hl7v2_results_dir, timezone=cfg.timezone)
            if cfg.hl7v2_results_dir
            else None,
        )
        stack.push_async_callback(client.close)
        await _detect_version(name, client, cfg.profile)
        clients[name] = client
    return clients, unavailable


async def open_idmap(cfg: IdMapSettings) -> Any:
    """The patient-id map the config names, seeded from `seed_file` when given."""
    if cfg.kind == "postgres":
        from mcp_fhir._secret import secret_from_env

        idmap: Any = await PostgresIdMap.connect(secret_from_env(cfg.dsn_env, "idmap.dsn_env").reveal())
    else:
        cfg.path.parent.mkdir(parents=True, exist_ok=True)
        idmap = SqliteIdMap(cfg.path)
    if cfg.seed_file is not None:
        await seed_idmap(idmap, load_idmap_yaml(cfg.seed_file))
    return idmap


async def held_for(clients: Mapping[str, FhirEHRClient]) -> dict[str, float]:
    """Seconds until each backend may be sent its next request (a Retry-After hold or the rate limit)."""
    out = {}
    for name, client in clients.items():
        guard = getattr(client, "_guard", None)
        if isinstance(guard, BackendGuard) and guard.limiter is not None:
            out[name] = await guard.limiter.held_for(name)
    return out


def breaker_snapshot(clients: Mapping[str, FhirEHRClient]) -> dict[str, str]:
    """Breaker states for health, by backend."""
    out = {}
    for name, client in clients.items():
        guard = getattr(client, "_guard", None)
        if isinstance(guard, BackendGuard):
            out[name] = guard.breaker.state.name.lower()
    return out
