"""Assemble each configured backend: profile, SMART credentials, TLS, pooled HTTP, and resilience.

Least privilege starts here: the token request asks only for the scopes the enabled tools
need, and tools whose scopes the EHR did not grant are reported unavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any

from mcp_fhir._exceptions import MCPFhirError, UpstreamBadResponse
from mcp_fhir._secret import secret_from_env
from mcp_fhir.activity import ActivityCounters, MemoryActivity, RedisActivity
from mcp_fhir.catalog import CATALOGUE, LOCAL_TYPES
from mcp_fhir.config import ActivitySettings, ConsentSettings, IdMapSettings, Settings, breaker_settings
from mcp_fhir.consent import ConsentReader, EhrConsentSource, PostgresConsentStore, SqliteConsentStore
from mcp_fhir.ehr.client import EHRClient, FhirEHRClient
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
from mcp_fhir.resilience.stores import redis_from_env

log = logging.getLogger("mcp_fhir.ehr")

MAX_CONSENTS = 100  # Consent resources read for one patient (one page)


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


# Not a tool: the consent reader's own need, when consent is read from the EHR (`consent.source: ehr`).
CONSENT_READER = "(consent)"
_CONSENT_NEED = {CONSENT_READER: ("search", ("Consent",))}


def smart_scopes(tools: Iterable[str], syntax: Any, *, consent_from_ehr: bool = False) -> list[str]:
    """The SMART scopes to request: the enabled EHR tools' needs, and Consent's own scope
    (`system/Consent.rs`, or `.read` in v1) only when consent is read from the EHR."""
    ehr_tools = [t for t in tools if not set(CATALOGUE[t][1]) <= LOCAL_TYPES]
    if consent_from_ehr:
        return required_scopes(
            [*ehr_tools, CONSENT_READER], syntax=syntax, catalogue={**CATALOGUE, **_CONSENT_NEED}
        )
    return required_scopes(ehr_tools, syntax=syntax, catalogue=CATALOGUE)


async def _smart(
    stack: AsyncExitStack,
    name: str,
    smart_settings: SmartSettings | None,
    tools: tuple[str, ...],
    max_retry_after: float,
    *,
    consent_from_ehr: bool = False,
) -> tuple[SmartBackendAuth | None, dict[str, tuple[str, ...]]]:
    if smart_settings is None:
        return None, {}
    syntax: Any = smart_settings.scope_syntax
    ehr_tools = [t for t in tools if not set(CATALOGUE[t][1]) <= LOCAL_TYPES]
    needs = {**CATALOGUE, **_CONSENT_NEED} if consent_from_ehr else CATALOGUE
    scopes = smart_scopes(tools, syntax, consent_from_ehr=consent_from_ehr)
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
    if consent_from_ehr and unavailable_tools([CONSENT_READER], auth.granted_scopes, syntax, needs):
        # Every decision about a patient then sees consent `unavailable`, and the policy fails closed.
        log.warning("backend %s did not grant the Consent scope: consent cannot be read", name)
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
            stack,
            name,
            settings.smart_settings(name),
            settings.tools,
            cfg.max_retry_after,
            consent_from_ehr=settings.consent.enabled and settings.consent.source == "ehr",
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


async def open_consent(
    stack: AsyncExitStack, cfg: ConsentSettings, backend: EHRClient
) -> ConsentReader | None:
    """The consent reader `consent` names (None when disabled), built once at start; closed by `stack`.

    The EHR source searches `Consent?patient=` through `backend` (its cache bypassed: the reader's
    TTL is the one cache, so that invalidation on write holds).
    """
    if not cfg.enabled:
        return None
    source: Any
    if cfg.source == "ehr":

        async def search(patient: str) -> list[dict[str, Any]]:
            found = await backend.search(
                "Consent", {"patient": patient}, patient=patient, page_size=MAX_CONSENTS, bypass_cache=True
            )
            if found.next_url is not None:  # more than one page: some directive would be missed
                raise UpstreamBadResponse("a patient has more Consent resources than one page holds")
            return found.resources

        source = EhrConsentSource(search)
    elif cfg.source == "postgres":
        dsn = secret_from_env(cfg.dsn_env, "consent.dsn_env")
        source = await PostgresConsentStore.connect(dsn.reveal(), table=cfg.table)
        stack.push_async_callback(source.aclose)
    else:
        source = SqliteConsentStore(cfg.path)
        stack.push_async_callback(source.aclose)
    return ConsentReader(source, ttl_seconds=cfg.ttl_seconds)


async def open_activity(stack: AsyncExitStack, cfg: ActivitySettings) -> ActivityCounters | None:
    """The activity counters `activity` names (None when disabled)."""
    if not cfg.enabled:
        return None
    if cfg.store == "redis":
        client = redis_from_env(cfg.redis_url_env, "activity.redis_url_env")
        stack.push_async_callback(client.aclose)
        key = secret_from_env(cfg.patient_key_env, "activity.patient_key_env")
        return RedisActivity(client, cfg.windows, prefix=cfg.key_prefix, key=key.reveal().encode())
    return MemoryActivity(cfg.windows)


async def open_idmap(cfg: IdMapSettings) -> Any:
    """The patient-id map the config names, seeded from `seed_file` when given."""
    if cfg.kind == "postgres":
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
