"""Bearer JWTs from the configured authorization server → ``Subject``.

Decoding is not validating. ``JwtVerifier.verify`` runs four explicit steps:

1. ``decode_header``   - split the compact JWS and parse its header, nothing trusted yet.
2. ``check_header``    - ``alg`` must be on the allow-list (asymmetric only: never ``none``,
                         never HS*, so "HS256 keyed with the public key" cannot pass) and
                         ``kid`` must be present; the key comes from the issuer's JWKS.
3. ``verify_signature`` - PyJWT verifies with exactly that key and that one algorithm;
                         the JWK's ``kty``/``alg`` must agree with the header ``alg``.
4. ``ClaimsValidator`` - ``iss`` exactly equal to the configured issuer; ``aud`` (string
                         or list) contains this server's canonical URI by exact string
                         equality (no trailing-slash folding: ``…/mcp`` ≠ ``…/mcp/``);
                         ``exp`` required and in the future; ``nbf`` honoured; ``iat``
                         not in the future; all with a named leeway and an injectable clock.

The ``Subject`` (``authn="oauth"``) carries every raw claim untouched. Python never turns
claims into roles: OPA reads them. Mapping rules:

- ``id``: the caller, i.e. the agent. For a delegation token (RFC 8693 §4.1) that is the actor,
  ``act.sub``; otherwise ``sub`` (required, non-empty string).
- ``on_behalf_of``: the party the agent acts for. For a delegation token, ``sub`` (the principal);
  otherwise the configured ``on_behalf_of_claim`` (a string claim), if set.
- ``scopes``: ``scope`` (space-separated string, RFC 8693/9068) or else ``scp`` (list or string).
OPA sees the raw ``sub`` and ``act`` claims either way.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import jwt as pyjwt
from jwt.api_jws import PyJWS

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.jwks import KeySource
from mcp_fhir.agent_auth.settings import AgentAuthSettings
from mcp_fhir.agent_auth.subject import Subject

__all__ = ["MAX_TOKEN_BYTES", "ClaimsValidator", "JwtVerifier", "check_header", "decode_header"]

MAX_TOKEN_BYTES: Final = 16 * 1024
_KTY_FOR_ALG_PREFIX: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CRV_FOR_ALG: Final = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite JSON number {name}")


def _strict_json(data: bytes | str) -> Any:
    """JSON without NaN/Infinity (which would make ``exp`` comparisons meaningless)."""
    return json.loads(data, parse_constant=_reject_constant)


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return _strict_json(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (binascii.Error, ValueError, UnicodeError) as exc:
        raise AgentAuthError("token_malformed") from exc


def decode_header(token: str) -> dict[str, Any]:
    """Step 1: the unverified JOSE header of a compact JWS. Trust nothing in it yet."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
        raise AgentAuthError("token_malformed")
    segments = token.split(".")
    if len(segments) != 3 or not segments[0] or not segments[1]:
        raise AgentAuthError("token_malformed")
    header = _b64url_json(segments[0])
    if not isinstance(header, dict):
        raise AgentAuthError("token_malformed")
    return header


def check_header(header: Mapping[str, Any], allowed_algorithms: tuple[str, ...]) -> tuple[str, str]:
    """Step 2: ``(alg, kid)`` if the algorithm is allow-listed and a ``kid`` is present."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed_algorithms:
        raise AgentAuthError("alg_not_allowed")
    if "crit" in header:  # we understand no critical extensions (RFC 7515 §4.1.11)
        raise AgentAuthError("token_malformed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AgentAuthError("unknown_kid")
    return alg, kid


def verify_signature(token: str, jwk: Mapping[str, Any], alg: str) -> dict[str, Any]:
    """Step 3: the payload, once the signature verifies with this key and this algorithm only."""
    jwk_alg = jwk.get("alg")
    if jwk_alg is not None and jwk_alg != alg:
        raise AgentAuthError("alg_not_allowed")
    if jwk.get("kty") != _KTY_FOR_ALG_PREFIX.get(alg[:2]):
        raise AgentAuthError("alg_not_allowed")
    if alg in _CRV_FOR_ALG and jwk.get("crv") != _CRV_FOR_ALG[alg]:
        raise AgentAuthError("alg_not_allowed")
    try:
        key = pyjwt.PyJWK(dict(jwk), algorithm=alg)
        decoded = PyJWS().decode_complete(token, key=key, algorithms=[alg])
    except pyjwt.InvalidSignatureError as exc:
        raise AgentAuthError("bad_signature") from exc
    except pyjwt.InvalidAlgorithmError as exc:
        raise AgentAuthError("alg_not_allowed") from exc
    except (pyjwt.PyJWKError, pyjwt.InvalidKeyError) as exc:
        raise AgentAuthError("jwks_unavailable") from exc
    except pyjwt.PyJWTError as exc:
        raise AgentAuthError("token_malformed") from exc
    try:
        claims = _strict_json(decoded["payload"])
    except ValueError as exc:
        raise AgentAuthError("token_malformed") from exc
    if not isinstance(claims, dict):
        raise AgentAuthError("token_malformed")
    return claims


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise AgentAuthError("token_malformed")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AgentAuthError("token_malformed")
    return float(value)


class ClaimsValidator:
    """Step 4: registered-claim checks on a verified payload, against an injectable clock."""

    def __init__(
        self, *, issuer: str, audience: str, leeway: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._clock = clock

    def validate(self, claims: Mapping[str, Any]) -> None:
        """Raise ``AgentAuthError`` with the first failing reason; return quietly if all pass."""
        sub = claims.get("sub")
        subject_id = sub if isinstance(sub, str) and sub else None
        if claims.get("iss") != self._issuer:
            raise AgentAuthError("wrong_issuer", subject_id=subject_id)
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience not in [a for a in audiences if isinstance(a, str)]:
            raise AgentAuthError("wrong_audience", subject_id=subject_id)
        now = self._clock()
        exp = _numeric_date(claims, "exp", required=True)
        if exp is not None and now >= exp + self._leeway:
            raise AgentAuthError("token_expired", subject_id=subject_id)
        nbf = _numeric_date(claims, "nbf", required=False)
        if nbf is not None and now + self._leeway < nbf:
            raise AgentAuthError("token_not_yet_valid", subject_id=subject_id)
        iat = _numeric_date(claims, "iat", required=False)
        if iat is not None and now + self._leeway < iat:
            raise AgentAuthError("token_not_yet_valid", subject_id=subject_id)
        if subject_id is None:
            raise AgentAuthError("token_malformed")


def _scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    scope = claims.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise AgentAuthError("token_malformed")
        return tuple(scope.split())
    scp = claims.get("scp")
    if scp is None:
        return ()
    if isinstance(scp, str):
        return tuple(scp.split())
    if isinstance(scp, list) and all(isinstance(s, str) for s in scp):
        return tuple(scp)
    raise AgentAuthError("token_malformed")


def _actor(claims: Mapping[str, Any]) -> str | None:
    """The RFC 8693 actor (`act.sub`): the agent acting for the token's `sub`."""
    act = claims.get("act")
    actor = act.get("sub") if isinstance(act, dict) else None
    return actor if isinstance(actor, str) and actor else None


def _on_behalf_of(claims: Mapping[str, Any], claim_name: str | None) -> str | None:
    if _actor(claims) is not None:
        return str(claims["sub"])  # a delegation token: the agent acts for its subject
    if claim_name is not None:
        value = claims.get(claim_name)
        return value if isinstance(value, str) and value else None
    return None


class JwtVerifier:
    """Turns a bearer JWT into a ``Subject``, or raises ``AgentAuthError`` with a reason."""

    def __init__(
        self, settings: AgentAuthSettings, jwks: KeySource, clock: Callable[[], float] = time.time
    ) -> None:
        if settings.issuer is None:
            raise ConfigError("auth.issuer", "is required to accept JWTs")
        if settings.audience is None:
            raise ConfigError("auth.audience", "is required to accept JWTs")
        self._settings = settings
        self._audience = settings.audience
        self._jwks = jwks
        self._claims = ClaimsValidator(
            issuer=settings.issuer, audience=settings.audience, leeway=settings.leeway_seconds, clock=clock
        )

    @property
    def audience(self) -> str:
        """This server's canonical URI, the one audience accepted."""
        return self._audience

    async def verify(self, token: str) -> Subject:
        """Header, key, signature, claims, in that order; then the ``Subject`` with raw claims."""
        header = decode_header(token)
        alg, kid = check_header(header, self._settings.allowed_algorithms)
        jwk = await self._jwks.get_key(kid)
        claims = verify_signature(token, jwk, alg)
        self._claims.validate(claims)
        return Subject(
            id=_actor(claims) or claims["sub"],
            authn="oauth",
            claims=claims,
            scopes=_scopes(claims),
            on_behalf_of=_on_behalf_of(claims, self._settings.on_behalf_of_claim),
        )
