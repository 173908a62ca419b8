"""Bearer JWTs from the configured authorization server → ``Subject``.

Decoding is not validating. ``JwtVerifier.verify`` runs four explicit steps:

1. ``decode_header``   - split the compact JWS and parse its header, nothing trusted yet.
2. ``check_header``    - ``alg`` must be on the allow-list (asymmetric only: never ``none``,
                         never HS*, so "HS256 keyed with the public key" cannot pass) and
                         ``kid`` must be present; the key comes from the issuer's JWKS.
3. ``verify_signature`` - PyJWT verifies with exactly that key and that one algorithm;
                         the JWK's ``kty``/``alg`` must agree with the header ``alg``.
4. ``ClaimsValidator`` - joserfc's ``JWTClaimsRegistry``: ``iss`` exactly equal to the
                         configured issuer; ``aud`` (string or list) contains this server's
                         canonical URI by exact string equality (no trailing-slash folding:
                         ``…/mcp`` ≠ ``…/mcp/``); ``exp`` required and in the future; ``nbf``
                         honoured; ``iat`` not in the future; ``sub`` required, not blank;
                         all with a named leeway and an injectable clock.

Libraries, and what is still ours: PyJWT verifies the signature (step 3) and joserfc checks the
claims (step 4). PyJWT's ``jwt.decode(..., audience=, issuer=, leeway=, options={"require": …})``
was the first choice for step 4, but it reads the time from ``datetime.now()`` inside
``_validate_claims`` with no way to inject a clock, and the leeway tests and the replay of
recorded tokens need one; joserfc's registry takes ``now=`` and the same leeway. What stays
hand-written is small and ours by nature: the allow-list and key/algorithm agreement checks
(steps 1-2, which run before any key is trusted), strict JSON (no ``NaN``/``Infinity``), the
mapping of library errors to our reason codes in a fixed order, and the ``Subject`` mapping.

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
from typing import Any, Final, cast

import jwt as pyjwt
from joserfc.errors import ExpiredTokenError, InvalidClaimError, MissingClaimError
from joserfc.jwt import JWTClaimsRegistry
from jwt.api_jws import PyJWS

from mcp_fhir._exceptions import ConfigError
from mcp_fhir.agent_auth.errors import AgentAuthError, AuthFailureReason
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


_CLAIM_ORDER: Final = ("iss", "aud", "exp", "nbf", "iat", "sub")
_REASON_FOR_CLAIM: Final[dict[str, AuthFailureReason]] = {
    "iss": "wrong_issuer",
    "aud": "wrong_audience",
    "exp": "token_expired",
    "nbf": "token_not_yet_valid",
    "iat": "token_not_yet_valid",
}


def _is_numeric_date(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


class ClaimsValidator:
    """Step 4: registered-claim checks on a verified payload, by joserfc's ``JWTClaimsRegistry``.

    The registry checks ``iss`` and ``aud`` by exact value (``aud`` may be a list holding ours),
    requires ``iss``, ``aud``, ``exp`` and a non-blank ``sub``, and checks ``exp``/``nbf``/``iat``
    against an injectable clock with one leeway. What stays ours is only the mapping of its
    errors to our reason codes, in a fixed order (issuer, audience, expiry, not-before, subject).
    """

    def __init__(
        self, *, issuer: str, audience: str, leeway: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._registry = JWTClaimsRegistry(
            now=cast("Callable[[], int]", clock),  # a float clock: joserfc compares, never truncates
            leeway=cast("int", leeway),
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True, "allow_blank": False},
        )

    def validate(self, claims: Mapping[str, Any]) -> None:
        """Raise ``AgentAuthError`` with the first failing reason; return quietly if all pass."""
        sub = claims.get("sub")
        subject_id = sub if isinstance(sub, str) and sub else None
        ordered = {name: claims[name] for name in _CLAIM_ORDER if name in claims}
        try:
            self._registry.validate(ordered)
        except MissingClaimError as exc:
            missing = set(exc.claim.split(","))
            reason: AuthFailureReason = "token_malformed"
            if "iss" in missing or "aud" in missing:
                reason = "wrong_issuer" if "iss" in missing else "wrong_audience"
            raise AgentAuthError(reason, subject_id=subject_id) from None
        except ExpiredTokenError:
            raise AgentAuthError("token_expired", subject_id=subject_id) from None
        except InvalidClaimError as exc:
            if exc.claim in ("exp", "nbf", "iat") and not _is_numeric_date(claims.get(exc.claim)):
                raise AgentAuthError("token_malformed") from None
            reason = _REASON_FOR_CLAIM.get(exc.claim, "token_malformed")
            raise AgentAuthError(reason, subject_id=subject_id) from None
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
