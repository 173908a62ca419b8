"""The issuer's JSON Web Key Set, fetched over one long-lived ``httpx2.AsyncClient`` and cached.

Rules (the durations are the ``auth.jwks`` section's, a ``JwksSettings``; the size bounds are
``DEFAULT_JWKS_MAX_BYTES`` and ``DEFAULT_JWKS_MAX_KEYS``):
- A fetched set is trusted for ``ttl_seconds``, then refetched on the next lookup.
- A ``kid`` missing from a fresh set triggers a refetch (the issuer may have rotated),
  but never more often than once per ``min_refresh_seconds``: a stream of tokens with
  made-up ``kid``s cannot turn us into a load generator against the issuer.
- Concurrent lookups share one refresh (single flight, under an ``asyncio.Lock``).
- A failed fetch is also remembered for ``min_refresh_seconds``; until then lookups fail
  fast with ``jwks_unavailable``. An expired set is never served (fail closed).
- Only public, asymmetric signing keys with a ``kid`` are kept: ``oct`` keys, keys carrying
  private members, and keys with ``use`` other than ``sig`` are dropped.
- Without a ``jwks_url`` the URL is discovered from the issuer's RFC 8414 metadata
  (``/.well-known/oauth-authorization-server``), falling back to OpenID discovery
  (``/.well-known/openid-configuration``); the metadata ``issuer`` must equal ours.

- One refresh (discovery and fetch together) has a total deadline of ``timeout_seconds``,
  under ``asyncio.timeout``: a server that answers one byte at a time cannot hold it longer.
- A cached key is served with no network call and no lock: the lookup comes first.

Every transport or format failure becomes ``AgentAuthError("jwks_unavailable")`` here, at one seam.

Why not PyJWT's ``PyJWKClient`` (2.15) or joserfc: joserfc has no fetcher at all (only key-set
parsing), and ``PyJWKClient`` does not fit an async, fail-closed verifier:

- it fetches with blocking ``urllib`` under a ``threading.Lock`` held across the request, so
  each refresh would need a thread, and every other lookup waits on that lock;
- its refresh floor (``cooldown_duration``) starts only on a *successful* fetch: while the
  issuer is down, every token with an unknown ``kid`` fetches again (we remember a failure
  for ``min_refresh_seconds`` and fail fast);
- its ``timeout`` bounds each socket operation, not the whole fetch, and the body is read
  with no size bound;
- its clock is ``time.monotonic`` with no injection, and it does no RFC 8414 discovery;
- ``PyJWKSet`` keeps ``oct`` keys when HMAC is available; we drop them before any lookup.

So the cache stays here (about 120 lines), and PyJWT does the key parsing and the signature
check (``jwt.py``). Speed was not the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx2

from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.settings import JwksSettings

__all__ = [
    "DEFAULT_JWKS_MAX_BYTES",
    "DEFAULT_JWKS_MAX_KEYS",
    "JwksCache",
    "KeySource",
    "discovery_urls",
]

DEFAULT_JWKS_MAX_BYTES: Final = 256 * 1024
DEFAULT_JWKS_MAX_KEYS: Final = 64
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_ASYMMETRIC_KTY: Final = frozenset({"RSA", "EC"})

logger = logging.getLogger(__name__)

Jwk = Mapping[str, Any]


class KeySource(Protocol):
    """Where a verifier gets the public JWK for a ``kid``."""

    async def get_key(self, kid: str) -> Jwk:
        """The JWK with this ``kid``; raises ``AgentAuthError`` (``unknown_kid``, ``jwks_unavailable``)."""
        ...


def discovery_urls(issuer: str) -> tuple[str, ...]:
    """RFC 8414 metadata URL (well-known inserted before the path), then the OpenID one (appended)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    oidc = urlunsplit((parts.scheme, parts.netloc, path + "/.well-known/openid-configuration", "", ""))
    return (rfc8414, oidc)


class JwksCache:
    """A TTL cache of one issuer's signing keys; ``get_key(kid)`` is the one door."""

    def __init__(
        self,
        client: httpx2.AsyncClient,
        *,
        jwks_url: str | None = None,
        issuer: str | None = None,
        settings: JwksSettings = JwksSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if jwks_url is None and issuer is None:
            raise ValueError("JwksCache needs a jwks_url or an issuer to discover it from")
        self._client = client
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._settings = settings  # validated: every duration positive and finite
        self._clock = clock
        self._lock = asyncio.Lock()
        self._keys: Mapping[str, Jwk] = MappingProxyType({})
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_failed = False
        self.fetches = 0  # network fetches of the key set, for tests and diagnostics

    async def get_key(self, kid: str) -> Jwk:
        """The public JWK for ``kid``, refreshing the set under the rules in the module docstring."""
        key = self._lookup(kid, self._clock())
        if key is not None:
            return key
        async with self._lock:
            now = self._clock()
            key = self._lookup(kid, now)
            if key is not None:
                return key
            recently_tried = (
                self._last_attempt is not None
                and now - self._last_attempt < self._settings.min_refresh_seconds
            )
            if recently_tried:
                if self._last_failed or not self._fresh(now):
                    raise AgentAuthError("jwks_unavailable")
                raise AgentAuthError("unknown_kid")
            await self._refresh(now)
            key = self._lookup(kid, self._clock())
        if key is None:
            raise AgentAuthError("unknown_kid")
        return key

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._settings.ttl_seconds

    def _lookup(self, kid: str, now: float) -> Jwk | None:
        return self._keys.get(kid) if self._fresh(now) else None

    async def _refresh(self, now: float) -> None:
        self._last_attempt = now
        self._last_failed = True
        self.fetches += 1
        try:
            async with asyncio.timeout(
                self._settings.timeout_seconds
            ):  # one deadline for discovery and fetch together
                url = self._jwks_url or await self._discover()
                document = await self._get_json(url)
        except TimeoutError:
            logger.warning("jwks fetch failed: deadline passed")
            raise AgentAuthError("jwks_unavailable") from None
        keys = _parse_jwks(document, DEFAULT_JWKS_MAX_KEYS)
        self._keys = MappingProxyType(keys)
        self._fetched_at = now
        self._last_failed = False
        logger.info("jwks refreshed: %d signing keys", len(keys))

    async def _discover(self) -> str:
        if self._issuer is None:  # pragma: no cover - guarded in __init__
            raise AgentAuthError("jwks_unavailable")
        for url in discovery_urls(self._issuer):
            try:
                metadata = await self._get_json(url)
            except AgentAuthError:
                continue
            jwks_uri = metadata.get("jwks_uri")
            if metadata.get("issuer") != self._issuer or not isinstance(jwks_uri, str):
                logger.warning("issuer metadata rejected: issuer mismatch or no jwks_uri")
                continue
            if urlsplit(jwks_uri).scheme not in ("https", urlsplit(self._issuer).scheme):
                continue
            self._jwks_url = jwks_uri
            return jwks_uri
        raise AgentAuthError("jwks_unavailable")

    async def _get_json(self, url: str) -> dict[str, Any]:
        """GET a bounded JSON object; every failure is ``jwks_unavailable`` (the one seam)."""
        try:
            async with self._client.stream(
                "GET", url, timeout=self._settings.timeout_seconds, headers={"Accept": "application/json"}
            ) as response:
                if response.status_code != 200:
                    raise AgentAuthError("jwks_unavailable")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > DEFAULT_JWKS_MAX_BYTES:
                        raise AgentAuthError("jwks_unavailable")
            document = json.loads(bytes(body))
        except AgentAuthError:
            logger.warning("jwks fetch failed")
            raise
        except (httpx2.HTTPError, ValueError) as exc:
            logger.warning("jwks fetch failed: %s", type(exc).__name__)
            raise AgentAuthError("jwks_unavailable") from exc
        if not isinstance(document, dict):
            raise AgentAuthError("jwks_unavailable")
        return document


def _parse_jwks(document: Mapping[str, Any], max_keys: int) -> dict[str, Jwk]:
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list) or len(raw_keys) > max_keys:
        raise AgentAuthError("jwks_unavailable")
    keys: dict[str, Jwk] = {}
    for jwk in raw_keys:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            continue
        if jwk.get("kty") not in _ASYMMETRIC_KTY or _PRIVATE_MEMBERS & jwk.keys():
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        keys[kid] = MappingProxyType(dict(jwk))
    return keys
