"""`FhirEHRClient` over `FakeEhrHttp`: cache, one token refresh on 401, continuations, vendor checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mcp_fhir._exceptions import UpstreamAuthError, UpstreamBadResponse, UpstreamUnavailable
from mcp_fhir.ehr.client import FhirEHRClient
from mcp_fhir.ehr.transport import FakeEhrHttp, Response, SentRequest
from mcp_fhir.resilience.cache import Cache, CacheSettings

BASE = "http://ehr.test/fhir"
OBS_TTL_S = CacheSettings().ttl_for("Observation")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _bundle(*ids: str, next_url: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "Observation", "id": i, "subject": {"reference": "Patient/b-1"}}}
            for i in ids
        ],
    }
    if next_url:
        body["link"] = [{"relation": "next", "url": next_url}]
    return body


@dataclass
class Upstream:
    """The EHR: answers through `respond`, and keeps every request it saw."""

    respond: Callable[[SentRequest], Response] = field(default=lambda r: Response(200, _bundle("o1")))
    requests: list[SentRequest] = field(default_factory=list)

    def handler(self, request: SentRequest) -> Response:
        self.requests.append(request)
        return self.respond(request)


@dataclass
class Tokens:
    """A fake token provider: each invalidation hands out the next token."""

    issued: list[str] = field(default_factory=lambda: ["t1"])
    invalidated: list[str] = field(default_factory=list)

    async def token(self) -> str:
        return self.issued[-1]

    async def invalidate(self, token: str) -> None:
        self.invalidated.append(token)
        self.issued.append(f"t{len(self.issued) + 1}")


def _client(upstream: Upstream, **kwargs: Any) -> FhirEHRClient:
    return FhirEHRClient("ehr", BASE, http=FakeEhrHttp(upstream.handler), **kwargs)


def _cached(upstream: Upstream, clock: Clock, **kwargs: Any) -> FhirEHRClient:
    return _client(upstream, cache=Cache(CacheSettings(), clock=clock), **kwargs)


async def _search(client: FhirEHRClient, **kwargs: Any) -> Any:
    return await client.search("Observation", {"patient": "b-1"}, patient="pat-1", page_size=10, **kwargs)


async def test_a_fresh_cache_hit_makes_no_upstream_call():
    upstream, clock = Upstream(), Clock()
    client = _cached(upstream, clock)
    first = await _search(client)
    clock.now += OBS_TTL_S - 1
    second = await _search(client)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert [r["id"] for r in second.resources] == ["o1"]
    assert len(upstream.requests) == 1


async def test_a_stale_entry_is_served_only_when_allowed_and_the_upstream_failed():
    upstream, clock = Upstream(), Clock()
    client = _cached(upstream, clock, allow_stale=True)
    await _search(client)
    clock.now += OBS_TTL_S + 5
    upstream.respond = lambda r: Response(503, None)
    stale = await _search(client)
    assert (stale.cache, stale.stale) == ("stale", True)
    assert stale.cache_age_seconds == pytest.approx(OBS_TTL_S + 5)
    assert len(upstream.requests) == 2


async def test_a_stale_entry_is_not_served_when_stale_is_not_allowed():
    upstream, clock = Upstream(), Clock()
    client = _cached(upstream, clock, allow_stale=False)
    await _search(client)
    clock.now += OBS_TTL_S + 5
    upstream.respond = lambda r: Response(503, None)
    with pytest.raises(UpstreamUnavailable) as caught:
        await _search(client)
    assert caught.value.code == "upstream_unavailable"


async def test_a_stale_entry_is_refetched_when_the_upstream_answers():
    upstream, clock = Upstream(), Clock()
    client = _cached(upstream, clock, allow_stale=True)
    await _search(client)
    clock.now += OBS_TTL_S + 5
    upstream.respond = lambda r: Response(200, _bundle("o2"))
    fresh = await _search(client)
    assert (fresh.cache, fresh.stale, [r["id"] for r in fresh.resources]) == ("miss", False, ["o2"])


async def test_bypass_skips_the_lookup_and_refreshes_the_entry():
    upstream, clock = Upstream(), Clock()
    client = _cached(upstream, clock)
    await _search(client)
    upstream.respond = lambda r: Response(200, _bundle("o2"))
    bypassed = await _search(client, bypass_cache=True)
    again = await _search(client)
    assert bypassed.cache == "bypass" and len(upstream.requests) == 2
    assert (again.cache, [r["id"] for r in again.resources]) == ("hit", ["o2"])


async def test_a_write_invalidates_that_patients_cached_entries_of_the_type():
    upstream, clock = Upstream(), Clock()

    def respond(request: SentRequest) -> Response:
        if request.method == "POST":
            return Response(201, {**request.json, "id": "new"})
        return Response(200, {**_bundle(), "entry": []})

    upstream.respond = respond
    client = _cached(upstream, clock)
    search = client.search
    await search("DocumentReference", {"patient": "b-1"}, patient="pat-1", page_size=10)
    created = await client.create(
        {"resourceType": "DocumentReference", "status": "current"},
        patient="pat-1",
        if_none_exist="identifier=x|1",
    )
    after = await search("DocumentReference", {"patient": "b-1"}, patient="pat-1", page_size=10)
    assert created.created is True
    assert after.cache == "miss"
    assert [r.method for r in upstream.requests] == ["GET", "POST", "GET"]
    assert upstream.requests[1].headers["If-None-Exist"] == "identifier=x|1"


async def test_a_401_refreshes_the_token_once_and_retries_with_the_new_one():
    upstream, tokens = Upstream(), Tokens()
    upstream.respond = lambda r: (
        Response(401, None) if r.headers["Authorization"] == "Bearer t1" else Response(200, _bundle("o1"))
    )
    result = await _search(_client(upstream, token_provider=tokens))
    assert [r["id"] for r in result.resources] == ["o1"]
    assert tokens.invalidated == ["t1"]
    assert [r.headers["Authorization"] for r in upstream.requests] == ["Bearer t1", "Bearer t2"]


async def test_a_second_401_after_the_refresh_is_upstream_auth_failed_without_another_refresh():
    upstream, tokens = Upstream(respond=lambda r: Response(401, None)), Tokens()
    with pytest.raises(UpstreamAuthError) as caught:
        await _search(_client(upstream, token_provider=tokens))
    assert caught.value.code == "upstream_auth_failed"
    assert tokens.invalidated == ["t1"]
    assert len(upstream.requests) == 2


@pytest.mark.parametrize(
    "next_url",
    [
        "http://evil.test/fhir/Observation?page=2",
        "http://ehr.test/fhirx/Observation?page=2",
        "https://ehr.test/fhir/Observation?page=2",
        "http://ehr.test/fhir/../admin/users",
        "http://ehr.test/fhir/%2e%2e/admin/users",
        "http://ehr.test.evil.test/fhir/Observation",
    ],
)
async def test_a_continuation_outside_the_base_is_refused_without_a_request(next_url: str):
    upstream = Upstream()
    with pytest.raises(UpstreamBadResponse) as caught:
        await _search(_client(upstream), next_url=next_url)
    assert caught.value.code == "upstream_bad_response"
    assert upstream.requests == []


async def test_a_continuation_inside_the_base_is_fetched_as_is():
    upstream = Upstream()
    await _search(_client(upstream), next_url=f"{BASE}/Observation?page=2&_count=10")
    assert str(upstream.requests[0].url) == f"{BASE}/Observation?page=2&_count=10"


async def test_the_vendor_query_check_runs_for_first_pages_only():
    upstream = Upstream(respond=lambda r: Response(200, _bundle("o1", next_url=f"{BASE}/Observation?p=2")))
    checked: list[tuple[str, Any]] = []
    client = _client(upstream, check_query=lambda rtype, params: checked.append((rtype, dict(params))))
    first = await _search(client)
    await _search(client, next_url=first.next_url)
    assert checked == [("Observation", {"patient": "b-1"})]
    assert len(upstream.requests) == 2


async def test_a_failing_vendor_query_check_stops_the_request():
    from mcp_fhir._exceptions import InvalidArgument

    def refuse(_rtype: str, _params: Any) -> None:
        raise InvalidArgument("patient_id", "is required by this backend")

    upstream = Upstream()
    with pytest.raises(InvalidArgument):
        await _search(_client(upstream, check_query=refuse))
    assert upstream.requests == []
