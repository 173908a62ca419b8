"""The SDK ``TokenVerifier`` for the streamable HTTP transport: JWT or API key → ``AccessToken``.

``AgentTokenVerifier.verify_token`` dispatches on the credential's shape (``mfk_`` prefix →
API key, anything else → JWT), and on any rejection calls ``on_reject(reason, subject_id)``
(the lead writes an ``auth_failure`` audit record there) and returns ``None``, which the
SDK turns into a 401 with ``WWW-Authenticate: Bearer … resource_metadata=…``.

The ``AccessToken`` it returns carries the whole ``Subject`` under ``claims[SUBJECT_CLAIM]``
so ``subject_from_access_token`` can rebuild it exactly inside a tool, and ``claims["iss"]``
so the SDK binds sessions to (client_id, issuer, subject). Tokens are never logged: only
the reason and a short sha256 fingerprint. The ``AccessToken``'s own ``token`` field holds that
fingerprint too (``sha256:<hex>``), not the credential: the object lives in the request scope for
the whole request and its pydantic repr prints every field, and neither the SDK's resource-server
side nor our code reads the raw value back.

If ``on_reject`` raises (say, the audit sink is down), the exception propagates and the
request fails with a 500 instead of a 401; either way nothing is served.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import httpx2
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.api_keys import ApiKeyStore, is_api_key
from mcp_fhir.agent_auth.errors import AgentAuthError, AuthFailureReason, token_fingerprint
from mcp_fhir.agent_auth.jwks import JwksCache
from mcp_fhir.agent_auth.jwt import JwtVerifier
from mcp_fhir.agent_auth.settings import AgentAuthSettings
from mcp_fhir.agent_auth.subject import Subject

__all__ = [
    "API_KEY_ISSUER",
    "SUBJECT_CLAIM",
    "AgentTokenVerifier",
    "OnReject",
    "auth_settings_for",
    "build_token_verifier",
    "subject_from_access_token",
]

OnReject = Callable[[str, str | None], Awaitable[None]]
SUBJECT_CLAIM: Final = "mcp_fhir_subject"
API_KEY_ISSUER: Final = "urn:mcp-fhir:api-key"

logger = logging.getLogger(__name__)


class AgentTokenVerifier:
    """Implements ``mcp.server.auth.provider.TokenVerifier``."""

    def __init__(
        self,
        jwt_verifier: JwtVerifier | None,
        api_keys: ApiKeyStore | None,
        on_reject: OnReject | None = None,
        *,
        resource: str | None = None,
    ) -> None:
        self._jwt = jwt_verifier
        self._api_keys = api_keys
        self._on_reject = on_reject
        self._resource = (
            resource if resource is not None else (jwt_verifier.audience if jwt_verifier else None)
        )

    def replace_api_keys(self, api_keys: ApiKeyStore | None) -> None:
        """Swap in a new key set (a config reload): the next request is checked against it alone."""
        self._api_keys = api_keys

    async def verify_token(self, token: str) -> AccessToken | None:
        """An ``AccessToken`` for a valid credential; ``None`` (after ``on_reject``) otherwise."""
        try:
            subject = await self.authenticate(token)
        except AgentAuthError as exc:
            logger.info("agent credential rejected: reason=%s fp=%s", exc.reason, token_fingerprint(token))
            await self.reject(exc.reason, exc.subject_id)
            return None
        return self._access_token(token, subject)

    async def authenticate(self, token: str) -> Subject:
        """The caller's ``Subject``, or ``AgentAuthError`` with a reason."""
        if not token:
            raise AgentAuthError("token_missing")
        if is_api_key(token):
            if self._api_keys is None:
                raise AgentAuthError("api_key_unknown")
            return self._api_keys.verify(token)
        if self._jwt is None:
            raise AgentAuthError("token_malformed")
        return await self._jwt.verify(token)

    async def reject(self, reason: AuthFailureReason, subject_id: str | None) -> None:
        """Report a rejection to the hook (also used by the HTTP middlewares)."""
        if self._on_reject is not None:
            await self._on_reject(reason, subject_id)

    def _access_token(self, token: str, subject: Subject) -> AccessToken:
        if subject.authn == "api_key":
            client_id = subject.id
            issuer: Any = API_KEY_ISSUER
            expires_at = self._api_keys.expires_at(subject.id) if self._api_keys is not None else None
        else:
            client_id = _client_id(subject.claims) or subject.id
            issuer = subject.claims.get("iss")
            exp = subject.claims.get("exp")
            expires_at = int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        return AccessToken(
            token="sha256:" + token_fingerprint(token),  # never the credential itself (module docstring)
            client_id=client_id,
            scopes=list(subject.scopes),
            expires_at=expires_at,
            resource=self._resource,
            subject=subject.id,
            claims={"iss": issuer, SUBJECT_CLAIM: subject.to_input()},
        )


def _client_id(claims: dict[str, Any]) -> str | None:
    for name in ("azp", "client_id"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def subject_from_access_token(access_token: AccessToken) -> Subject:
    """Rebuild the exact ``Subject`` an ``AgentTokenVerifier`` authenticated (from ``get_access_token()``)."""
    block = (access_token.claims or {}).get(SUBJECT_CLAIM)
    if not isinstance(block, dict):
        raise AgentAuthError("token_malformed")
    try:
        return Subject(
            id=block["id"],
            authn=block["authn"],
            claims=copy.deepcopy(block["claims"]),
            scopes=tuple(block["scopes"]),
            on_behalf_of=block["on_behalf_of"],
        )
    except (KeyError, TypeError) as exc:
        raise AgentAuthError("token_malformed") from exc


def build_token_verifier(
    settings: AgentAuthSettings, http_client: httpx2.AsyncClient, on_reject: OnReject | None = None
) -> AgentTokenVerifier:
    """Wire the verifier from settings: a JWKS cache on ``http_client`` (long-lived) and the API keys."""
    jwt_verifier = None
    if settings.accepts_jwt:
        jwks = JwksCache(
            http_client,
            jwks_url=settings.jwks_url,
            issuer=settings.issuer,
            settings=settings.jwks,
        )
        jwt_verifier = JwtVerifier(settings, jwks)
    api_keys = ApiKeyStore(settings.api_keys) if settings.api_keys else None
    if jwt_verifier is None and api_keys is None:
        raise ConfigError("auth", "HTTP transport needs an issuer and audience, or at least one API key")
    return AgentTokenVerifier(jwt_verifier, api_keys, on_reject, resource=settings.audience)


def auth_settings_for(settings: AgentAuthSettings, *, resource_server_url: str | None = None) -> AuthSettings:
    """The SDK ``AuthSettings``: issuer, this resource's URL, required scopes, resource binding on."""
    resource = resource_server_url or settings.audience
    if resource is None:
        raise ConfigError("auth.audience", "is required for the HTTP transport")
    if settings.issuer is None:
        raise ConfigError("auth.issuer", "is required: Protected Resource Metadata must name an issuer")
    return AuthSettings(
        issuer_url=settings.issuer,  # type: ignore[arg-type]
        resource_server_url=resource,  # type: ignore[arg-type]
        required_scopes=list(settings.required_scopes) or None,
        validate_token_resource=True,
    )
