"""Our signing keys for SMART Backend Services, and the public JWKS the EHR registers.

Private keys are PEM (PKCS#8 or traditional), read from a file or from an environment variable,
never inline in the configuration. Only two shapes are accepted, matching the algorithms the SMART
spec and the major EHRs allow:

    RS384  an RSA key of at least ``MIN_RSA_BITS`` bits
    ES384  an EC key on the P-384 curve

``public_jwks(keys)`` derives the RFC 7517 JWK Set to publish (the lead mounts it at
``/.well-known/jwks.json``). It is built from the *public* halves only, so it can never carry
``d``, ``p``, ``q``, ``dp``, ``dq`` or ``qi``. Publish old keys next to the active one while the EHR
may still hold tokens signed by them; rotate by ``kid``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mcp_fhir._exceptions import ConfigError

__all__ = [
    "ALLOWED_ALGORITHMS",
    "MAX_PEM_BYTES",
    "MIN_RSA_BITS",
    "Algorithm",
    "SigningKey",
    "load_signing_key",
    "public_jwk",
    "public_jwks",
    "signing_key_from_pem",
]

Algorithm = Literal["RS384", "ES384"]
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"RS384", "ES384"})
MIN_RSA_BITS = 2048
MAX_PEM_BYTES = 64 * 1024
_P384_COORDINATE_BYTES = 48

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    """One private key with the ``kid`` and algorithm it signs under. Its repr never shows the key."""

    kid: str
    algorithm: Algorithm
    private_key: PrivateKey = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r}, private_key=[secure])"


def signing_key_from_pem(pem: bytes, *, kid: str, algorithm: str, key: str) -> SigningKey:
    """Parse a PEM private key and check it fits ``algorithm``; ``key`` is the config path used in errors."""
    if algorithm not in ALLOWED_ALGORITHMS:
        raise ConfigError(key, f"algorithm must be one of {sorted(ALLOWED_ALGORITHMS)}")
    if not kid:
        raise ConfigError(key, "needs a non-empty key_id (kid)")
    if len(pem) > MAX_PEM_BYTES:
        raise ConfigError(key, f"is larger than {MAX_PEM_BYTES} bytes")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(key, "is not an unencrypted PEM private key") from exc
    if algorithm == "RS384":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ConfigError(key, "RS384 needs an RSA private key")
        if private.key_size < MIN_RSA_BITS:
            raise ConfigError(key, f"RSA key must be at least {MIN_RSA_BITS} bits")
        return SigningKey(kid=kid, algorithm="RS384", private_key=private)
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP384R1):
        raise ConfigError(key, "ES384 needs an EC private key on curve P-384")
    return SigningKey(kid=kid, algorithm="ES384", private_key=private)


def load_signing_key(
    *,
    file: str | os.PathLike[str] | None,
    env: str | None,
    kid: str,
    algorithm: str,
    key: str,
    environ: Mapping[str, str] | None = None,
) -> SigningKey:
    """Load a PEM private key from exactly one of ``file`` or the environment variable named ``env``."""
    if (file is None) == (env is None):
        raise ConfigError(key, "set exactly one of private_key_file or private_key_env")
    if file is not None:
        try:
            pem = Path(file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key}.private_key_file", "cannot be read") from exc
        return signing_key_from_pem(pem, kid=kid, algorithm=algorithm, key=f"{key}.private_key_file")
    source = os.environ if environ is None else environ
    value = source.get(env or "")
    if not value:
        raise ConfigError(f"{key}.private_key_env", "names an environment variable that is unset or empty")
    return signing_key_from_pem(value.encode(), kid=kid, algorithm=algorithm, key=f"{key}.private_key_env")


def _b64url_uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode("ascii")


def public_jwk(key: SigningKey) -> dict[str, Any]:
    """The RFC 7517 public JWK for one signing key: only public members, plus kid, alg, use, key_ops."""
    base: dict[str, Any]
    private = key.private_key
    if isinstance(private, rsa.RSAPrivateKey):
        numbers = private.public_key().public_numbers()
        base = {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    else:
        point = private.public_key().public_numbers()
        base = {
            "kty": "EC",
            "crv": "P-384",
            "x": _b64url_uint(point.x, _P384_COORDINATE_BYTES),
            "y": _b64url_uint(point.y, _P384_COORDINATE_BYTES),
        }
    return {**base, "kid": key.kid, "alg": key.algorithm, "use": "sig", "key_ops": ["verify"]}


def public_jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    """Our JWK Set: one public JWK per key, first key first, duplicate kids rejected."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for key in keys:
        if key.kid in seen:
            raise ConfigError("smart.additional_keys", f"kid '{key.kid}' is used twice")
        seen.add(key.kid)
        out.append(public_jwk(key))
    return {"keys": out}
