"""The EHR client seam: what the tools need from an EHR, and the real implementation over FHIR.

`EHRClient` is the interface; `FhirEHRClient` is the real one (fhirpy query building on the
pooled aiohttp transport, a SMART token, the backend's profile, cache, rate limit, circuit
breaker and read retries); `FakeEHRClient` is the in-package fake for unit tests.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from mcp_fhir import metrics
from mcp_fhir._exceptions import (
    MCPFhirError,
    UpstreamAuthError,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from mcp_fhir.ehr.hl7_results import HL7_RESOURCE_TYPES, Hl7ResultsSource
from mcp_fhir.ehr.paging import Cursor, is_cursor, read_cursor
from mcp_fhir.ehr.transport import EhrHttp, PooledFHIRClient, Response, send
from mcp_fhir.resilience.cache import Cache, CacheKey

Params = Mapping[str, str | Sequence[str]]
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# On a search that mixes sources, what marks a resource from the EHR's FHIR API (HL7 v2 results carry
# `hl7v2.SOURCE_TAG`, same system).
FHIR_SOURCE_TAG = {
    "system": "urn:mcp-fhir:provenance",
    "code": "fhir-api",
    "display": "From the EHR's FHIR API",
}


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Resources from one upstream interaction, with where and when they came from."""

    resources: list[dict[str, Any]]
    backend: str
    retrieved_at: datetime
    cache: str = "miss"  # hit | miss | bypass | stale
    cache_age_seconds: float = 0.0
    total: int | None = None
    next_url: str | None = None
    stale: bool = False
    unmapped: tuple[str, ...] = ()
    created: bool | None = None
    # Where each resource came from, by "Type/id", on a search that draws on more than the FHIR API:
    # "fhir" (the EHR's FHIR API) or "hl7v2" (the backend's HL7 v2 results). Empty: all from the FHIR API.
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def last_updated(self) -> str | None:
        """The newest `meta.lastUpdated` among the resources."""
        stamps = [r.get("meta", {}).get("lastUpdated") for r in self.resources]
        return max((s for s in stamps if isinstance(s, str)), default=None)

    def source_of(self, resource: Mapping[str, Any]) -> str:
        """ "fhir" or "hl7v2": where `resource` (one of `resources`) came from."""
        return self.sources.get(f"{resource.get('resourceType')}/{resource.get('id')}", "fhir")


class TokenProvider(Protocol):
    async def token(self) -> str: ...
    async def invalidate(self, token: str) -> None: ...


class EHRClient(Protocol):
    """What the tools need from an EHR. Raises `UpstreamError` leaves; never returns partial data as whole."""

    name: str

    async def search(
        self,
        resource_type: str,
        params: Params,
        *,
        patient: str | None,
        page_size: int,
        next_url: str | None = None,
        bypass_cache: bool = False,
    ) -> FetchResult: ...

    async def read(
        self, resource_type: str, resource_id: str, *, patient: str | None, bypass_cache: bool = False
    ) -> FetchResult: ...

    async def create(
        self, resource: dict[str, Any], *, patient: str | None, if_none_exist: str | None
    ) -> FetchResult: ...

    async def transaction(self, bundle: dict[str, Any], *, patient: str | None) -> FetchResult: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


def _to_cache(result: FetchResult) -> dict[str, Any]:
    return {
        "resources": result.resources,
        "total": result.total,
        "next": result.next_url,
        "retrieved_at": result.retrieved_at.isoformat(),
    }


def _from_cache(
    value: Mapping[str, Any], backend: str, outcome: str, age: float, *, stale: bool = False
) -> FetchResult:
    return FetchResult(
        list(value["resources"]),
        backend,
        datetime.fromisoformat(value["retrieved_at"]),
        cache=outcome,
        cache_age_seconds=age,
        total=value.get("total"),
        next_url=value.get("next"),
        stale=stale,
    )


class Guard(Protocol):
    """Rate limit → circuit breaker → retries (reads only), around one upstream request."""

    async def run(self, call: Callable[[], Awaitable[Any]], *, idempotent: bool) -> Any: ...


def _bundle_resources(body: Any, resource_type: str) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Resources of `resource_type` from a searchset Bundle; OperationOutcome entries are dropped."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "Bundle":
        raise UpstreamBadResponse("the EHR answered a search with something other than a Bundle")
    entries = body.get("entry") or []
    if not isinstance(entries, list):
        raise UpstreamBadResponse("the EHR's Bundle.entry is not a list")
    out = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping):
            raise UpstreamBadResponse("a Bundle entry has no resource")
        if resource.get("resourceType") == resource_type:
            out.append(dict(resource))
    next_url = next(
        (
            link.get("url")
            for link in body.get("link") or []
            if isinstance(link, Mapping) and link.get("relation") == "next"
        ),
        None,
    )
    total = body.get("total") if isinstance(body.get("total"), int) else None
    return out, total, next_url


Normaliser = Callable[[dict[str, Any]], dict[str, Any]]


def _plain(params: Params) -> dict[str, str | list[str]]:
    """Search parameters as JSON-ready values (a cursor carries them)."""
    return {str(k): v if isinstance(v, str) else [str(i) for i in v] for k, v in params.items()}


def _tagged(resources: list[dict[str, Any]], tag: Mapping[str, str]) -> list[dict[str, Any]]:
    """Copies of `resources` whose `meta.tag` holds `tag` (the cached originals are left alone)."""
    out = []
    for resource in resources:
        meta = dict(resource.get("meta") or {})
        # Any provenance tag the resource already carries is replaced: only the sidecar says where it came from.
        tags = [
            t for t in meta.get("tag") or [] if isinstance(t, Mapping) and t.get("system") != tag["system"]
        ]
        meta["tag"] = [*tags, dict(tag)]
        out.append({**resource, "meta": meta})
    return out


def _sources(resources: list[dict[str, Any]], source: str) -> dict[str, str]:
    return {f"{r.get('resourceType')}/{r.get('id')}": source for r in resources}


def _inside(base_url: str, url: str) -> bool:
    """`url` lies under `base_url`: same prefix, and no dot segment (plain or %-encoded) that climbs out of it."""
    if not url.startswith(base_url + "/"):
        return False
    segments = unquote(urlsplit(url).path).split("/")
    return not any(segment in (".", "..") for segment in segments)


class FhirEHRClient:
    """The real EHR client for one backend: cache → (rate limit → breaker → retry) → token → HTTP."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        http: EhrHttp,
        token_provider: TokenProvider | None = None,
        normalise: Normaliser | None = None,
        guard: Guard | None = None,
        cache: Cache | None = None,
        allow_stale: bool = False,
        check_query: Callable[[str, Any], None] | None = None,
        hl7_results: Hl7ResultsSource | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._tokens = token_provider
        self._normalise = normalise
        self._guard = guard
        self._cache = cache
        self._allow_stale = allow_stale
        self._check_query = check_query
        self._hl7 = hl7_results
        self.fhir_version: str | None = None
        self.fhir = PooledFHIRClient(self.base_url, self._send)

    @property
    def token_provider(self) -> TokenProvider | None:
        """Where this client gets its EHR tokens (the SMART client publishes its keys from it)."""
        return self._tokens

    async def _request(self, method: str, url: str, body: Any, headers: Mapping[str, str]) -> Response:
        if self._tokens is None:
            return await send(self._http, method, url, json_body=body, headers=headers)

        async def with_token(token: str) -> Response:
            bearer = {**headers, "Authorization": f"Bearer {token}"}
            return await send(self._http, method, url, json_body=body, headers=bearer)

        token = await self._tokens.token()
        try:
            return await with_token(token)
        except UpstreamAuthError:
            # One retry with a fresh token, then the error stands.
            await self._tokens.invalidate(token)
            return await with_token(await self._tokens.token())

    async def _send(self, method: str, url: str, body: Any, headers: Mapping[str, str]) -> Response:
        started = time.perf_counter()
        status = "error"
        try:
            response = await self._request(method, url, body, headers)
            status = str(response.status)
            return response
        except MCPFhirError as exc:
            status = str(exc.details.get("status", exc.code))
            raise
        finally:
            metrics.UPSTREAM_LATENCY.labels(self.name).observe(time.perf_counter() - started)
            metrics.UPSTREAM_STATUS.labels(self.name, status).inc()

    async def _guarded(self, call: Callable[[], Awaitable[Any]], *, idempotent: bool) -> Any:
        if self._guard is None:
            return await call()
        return await self._guard.run(call, idempotent=idempotent)

    def set_normaliser(self, normalise: Normaliser | None, *, fhir_version: str) -> None:
        """Switch the normaliser after version detection (e.g. an STU3 server behind a generic profile)."""
        self._normalise = normalise
        self.fhir_version = fhir_version

    def _norm(self, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._normalise(r) for r in resources] if self._normalise else resources

    async def _cached(
        self, key: CacheKey | None, bypass: bool, fetch: Callable[[], Awaitable[FetchResult]]
    ) -> FetchResult:
        """A fresh entry answers; otherwise fetch. On an upstream failure a stale entry answers only if allowed."""
        if self._cache is None or key is None:
            return await fetch()
        found = None if bypass else await self._cache.lookup(key)
        entry = found.entry if found is not None else None
        if found is not None and found.outcome == "hit" and entry is not None:
            return _from_cache(entry.value, self.name, "hit", entry.age(self._cache.now()))
        try:
            result = await fetch()
        except (UpstreamUnavailable, UpstreamRateLimited):
            if self._allow_stale and entry is not None:
                return _from_cache(entry.value, self.name, "stale", entry.age(self._cache.now()), stale=True)
            raise
        await self._cache.put(key, _to_cache(result))
        return replace(result, cache="bypass" if bypass else "miss")

    async def search(
        self,
        resource_type: str,
        params: Params,
        *,
        patient: str | None,
        page_size: int = DEFAULT_PAGE_SIZE,
        next_url: str | None = None,
        bypass_cache: bool = False,
    ) -> FetchResult:
        """One page of at most `page_size` resources: the EHR's first, then the backend's HL7 v2 results.

        The HL7 v2 results (Observations and DiagnosticReports) obey the same filters as the EHR's (see
        ``ehr/local_search.py``) and are paged after the EHR's last page; an EHR page larger than `page_size`
        is trimmed, and the rest comes with the continuation (``ehr/paging.py``). On such a search every
        resource says where it came from: a ``meta.tag`` (``urn:mcp-fhir:provenance``) and ``sources``.
        """
        size = max(1, min(page_size, MAX_PAGE_SIZE))
        if next_url is None:
            if self._check_query is not None:
                self._check_query(
                    resource_type, params
                )  # the vendor's rules, e.g. Oracle Health needs a patient
            cursor = Cursor(query=_plain(params), count=size)
        elif is_cursor(self.base_url, next_url):
            cursor = read_cursor(self.base_url, next_url)
            if cursor.upstream is not None and not _inside(self.base_url, cursor.upstream):
                raise UpstreamBadResponse("a continuation points outside the backend")
        elif _inside(self.base_url, next_url):
            cursor = Cursor(query=_plain(params), upstream=next_url, count=size)
        else:
            raise UpstreamBadResponse("a continuation points outside the backend")
        merge = self._hl7 is not None and resource_type in HL7_RESOURCE_TYPES
        if cursor.hl7 is not None:
            if not merge:
                raise UpstreamBadResponse("a continuation is malformed")
            return self._hl7_page(resource_type, cursor, size, before=[], upstream=None)

        page = await self._upstream_page(resource_type, cursor, patient, bypass_cache)
        window = page.resources[cursor.skip : cursor.skip + size]
        total = page.total if page.total is not None else cursor.total
        nxt: str | None
        if cursor.skip + size < len(page.resources):  # the EHR sent more than asked: trim, continue inside
            nxt = replace(cursor, skip=cursor.skip + size, total=total).encode(self.base_url)
        elif page.next_url and merge:
            after = Cursor(query=cursor.query, upstream=page.next_url, count=cursor.count, total=total)
            nxt = after.encode(self.base_url)
        elif page.next_url or not merge:
            nxt = page.next_url
        else:  # the EHR's last page: the HL7 v2 results follow, from this page on
            return self._hl7_page(resource_type, replace(cursor, hl7=0, total=total), size, window, page)
        if merge:
            local = len(self._hl7.search(resource_type, cursor.query)) if self._hl7 is not None else 0
            return replace(
                page,
                resources=_tagged(window, FHIR_SOURCE_TAG),
                next_url=nxt,
                total=total + local if total is not None else None,
                sources=_sources(window, "fhir"),
            )
        return replace(page, resources=window, next_url=nxt, total=total)

    async def _upstream_page(
        self, resource_type: str, cursor: Cursor, patient: str | None, bypass_cache: bool
    ) -> FetchResult:
        """The EHR page `cursor` is on: its first page (built from the query) or a link it gave."""
        query: Any = None
        path = cursor.upstream or resource_type
        if cursor.upstream is None:
            query = self.fhir.resources(resource_type).search(**cursor.query).limit(cursor.count).params

        async def fetch() -> FetchResult:
            body = await self._guarded(
                lambda: self.fhir.execute(path, method="get", params=query), idempotent=True
            )
            resources, total, nxt = _bundle_resources(body, resource_type)
            return FetchResult(self._norm(resources), self.name, datetime.now(UTC), total=total, next_url=nxt)

        key = None
        if self._cache is not None:
            canonical = json.dumps(query, sort_keys=True, default=str) if query is not None else path
            key = CacheKey.build(self.name, patient, resource_type, {"q": canonical or ""})
        return await self._cached(key, bypass_cache, fetch)

    def _hl7_page(
        self,
        resource_type: str,
        cursor: Cursor,
        size: int,
        before: list[dict[str, Any]],
        upstream: FetchResult | None,
    ) -> FetchResult:
        """`before` (the EHR's last resources, if any), then HL7 v2 results from `cursor.hl7`, up to `size`."""
        found = self._hl7.search(resource_type, cursor.query) if self._hl7 is not None else []
        start = cursor.hl7 or 0
        taken = found[start : start + size - len(before)]
        seen = {r.get("id") for r in before}
        extra = [copy.deepcopy(r) for r in taken if r.get("id") not in seen]
        end = start + len(taken)
        nxt = replace(cursor, hl7=end).encode(self.base_url) if end < len(found) else None
        total = cursor.total + len(found) if cursor.total is not None else None
        resources = [*_tagged(before, FHIR_SOURCE_TAG), *extra]
        sources = {**_sources(before, "fhir"), **_sources(extra, "hl7v2")}
        if upstream is not None:
            return replace(upstream, resources=resources, next_url=nxt, total=total, sources=sources)
        return FetchResult(
            resources, self.name, datetime.now(UTC), total=total, next_url=nxt, sources=sources
        )

    async def read(
        self, resource_type: str, resource_id: str, *, patient: str | None, bypass_cache: bool = False
    ) -> FetchResult:
        async def fetch() -> FetchResult:
            body = await self._guarded(
                lambda: self.fhir.execute(f"{resource_type}/{resource_id}", method="get"), idempotent=True
            )
            if not isinstance(body, Mapping) or body.get("resourceType") != resource_type:
                raise UpstreamBadResponse("the EHR answered a read with the wrong resource type")
            return FetchResult(self._norm([dict(body)]), self.name, datetime.now(UTC))

        key = CacheKey.build(self.name, patient, resource_type, {"id": resource_id}) if self._cache else None
        return await self._cached(key, bypass_cache, fetch)

    async def create(
        self, resource: dict[str, Any], *, patient: str | None, if_none_exist: str | None
    ) -> FetchResult:
        rtype = str(resource.get("resourceType"))
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None

        async def call() -> Any:
            return await self.fhir.request("post", rtype, data=resource, headers=headers)

        # Writes are never retried blindly; the conditional create makes a client's own retry safe instead.
        body, status = await self._guarded(call, idempotent=False)
        if self._cache is not None:
            await self._cache.invalidate_patient(self.name, patient, [rtype])
        if not isinstance(body, Mapping) or body.get("resourceType") != rtype:
            raise UpstreamBadResponse("the EHR answered a create with the wrong resource type")
        return FetchResult([dict(body)], self.name, datetime.now(UTC), created=status == 201)

    async def transaction(self, bundle: dict[str, Any], *, patient: str | None) -> FetchResult:
        """POST a transaction Bundle to the base; one result: the transaction-response Bundle.

        Never retried blindly (a conditional create in it makes a client's own retry safe). `created`
        is whether its first entry was created (201) rather than found (200)."""

        async def call() -> Any:
            return await self.fhir.request(
                "post", "", data=bundle, headers={"Prefer": "return=representation"}
            )

        body, _status = await self._guarded(call, idempotent=False)
        if self._cache is not None:
            types = sorted({str(e.get("resource", {}).get("resourceType")) for e in bundle.get("entry", [])})
            await self._cache.invalidate_patient(self.name, patient, types)
        if (
            not isinstance(body, Mapping)
            or body.get("resourceType") != "Bundle"
            or not isinstance(body.get("entry"), list)
            or len(body["entry"]) != len(bundle.get("entry", []))
        ):
            raise UpstreamBadResponse("the EHR answered a transaction with something other than its response")
        first = (body["entry"][0] or {}).get("response") or {}
        created = str(first.get("status", "")).startswith("201")
        return FetchResult([dict(body)], self.name, datetime.now(UTC), created=created)

    async def capability_statement(self) -> dict[str, Any]:
        body = await self._guarded(lambda: self.fhir.execute("metadata", method="get"), idempotent=True)
        if not isinstance(body, Mapping) or body.get("resourceType") != "CapabilityStatement":
            raise UpstreamBadResponse("the EHR's /metadata is not a CapabilityStatement")
        return dict(body)

    async def healthy(self) -> bool:
        try:
            await self.capability_statement()
        except UpstreamError:
            return False
        return True

    async def close(self) -> None:
        await self._http.aclose()


@dataclass
class FakeEHRClient:
    """An in-package fake for unit tests: serves resources from memory and records every call."""

    name: str = "fake"
    resources: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail_with: MCPFhirError | None = None
    transactions: list[dict[str, Any]] = field(default_factory=list)

    def _check(self, op: str, rtype: str) -> None:
        self.calls.append((op, rtype))
        if self.fail_with is not None:
            raise self.fail_with

    async def search(
        self,
        resource_type: str,
        params: Params,
        *,
        patient: str | None,
        page_size: int = 50,
        next_url: str | None = None,
        bypass_cache: bool = False,
    ) -> FetchResult:
        self._check("search", resource_type)
        found = [r for r in self.resources if r.get("resourceType") == resource_type]
        return FetchResult(found[:page_size], self.name, datetime.now(UTC), total=len(found))

    async def read(
        self, resource_type: str, resource_id: str, *, patient: str | None, bypass_cache: bool = False
    ) -> FetchResult:
        self._check("read", resource_type)
        found = [
            r for r in self.resources if r.get("resourceType") == resource_type and r.get("id") == resource_id
        ]
        return FetchResult(found[:1], self.name, datetime.now(UTC))

    async def create(
        self, resource: dict[str, Any], *, patient: str | None, if_none_exist: str | None
    ) -> FetchResult:
        self._check("create", str(resource.get("resourceType")))
        stored = {**resource, "id": f"fake-{len(self.resources) + 1}"}
        self.resources.append(stored)
        return FetchResult([stored], self.name, datetime.now(UTC), created=True)

    async def transaction(self, bundle: dict[str, Any], *, patient: str | None) -> FetchResult:
        """Stores each entry's resource (a conditional create finds an earlier match); answers as an EHR does."""
        self._check("transaction", "Bundle")
        self.transactions.append(bundle)
        entries = []
        for entry in bundle.get("entry", []):
            resource, request = entry["resource"], entry.get("request", {})
            match = _conditional_match(self.resources, resource, request.get("ifNoneExist"))
            if match is None:
                match = {**resource, "id": f"fake-{len(self.resources) + 1}"}
                self.resources.append(match)
                status = "201 Created"
            else:
                status = "200 OK"
            entries.append(
                {
                    "resource": match,
                    "response": {"status": status, "location": f"{match['resourceType']}/{match['id']}"},
                }
            )
        response = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
        return FetchResult(
            [response],
            self.name,
            datetime.now(UTC),
            created=entries[0]["response"]["status"].startswith("201"),
        )

    async def healthy(self) -> bool:
        return self.fail_with is None

    async def close(self) -> None:
        return None


def _conditional_match(
    stored: list[dict[str, Any]], resource: Mapping[str, Any], if_none_exist: str | None
) -> dict[str, Any] | None:
    """For the fake: an earlier resource of the same type matching `identifier=system|value`."""
    if not if_none_exist or not if_none_exist.startswith("identifier="):
        return None
    system, _, value = if_none_exist.removeprefix("identifier=").partition("|")
    for r in stored:
        if r.get("resourceType") == resource.get("resourceType") and any(
            i.get("system") == system and i.get("value") == value for i in r.get("identifier") or []
        ):
            return r
    return None
