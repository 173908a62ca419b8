"""Why an agent was not authenticated: one error class with a reason from a finite set.

    AuthenticationError (mcp_fhir._exceptions)      code: unauthenticated
    └── AgentAuthError                               reason: one of REASONS

The ``reason`` is the contract (tests, metrics labels and the ``auth_failure`` audit
record rely on it); the message is a fixed sentence per reason and never holds the
token, a key, or any claim value.
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal, get_args

from mcp_fhir._exceptions import AuthenticationError

__all__ = ["REASONS", "AgentAuthError", "AuthFailureReason", "token_fingerprint"]

AuthFailureReason = Literal[
    "token_missing",
    "token_malformed",
    "alg_not_allowed",
    "unknown_kid",
    "bad_signature",
    "wrong_issuer",
    "wrong_audience",
    "token_expired",
    "token_not_yet_valid",
    "token_in_query",
    "api_key_unknown",
    "jwks_unavailable",
    "insufficient_scope",
]
REASONS: Final[frozenset[str]] = frozenset(get_args(AuthFailureReason))

FINGERPRINT_HEX_CHARS: Final = 12

_MESSAGES: Final[dict[str, str]] = {
    "token_missing": "no credentials were presented",
    "token_malformed": "the credentials are not a well-formed token",
    "alg_not_allowed": "the token's signing algorithm is not allowed",
    "unknown_kid": "the token's key id is not in the issuer's key set",
    "bad_signature": "the token's signature does not verify",
    "wrong_issuer": "the token was issued by an untrusted issuer",
    "wrong_audience": "the token was not issued for this resource",
    "token_expired": "the credentials have expired",
    "token_not_yet_valid": "the token is not valid yet",
    "token_in_query": "credentials must travel in the Authorization header, never in the query string",
    "api_key_unknown": "the API key is not known",
    "jwks_unavailable": "the issuer's key set could not be obtained",
    "insufficient_scope": "the credentials lack a required scope",
}


class AgentAuthError(AuthenticationError):
    """An agent's credentials were rejected; ``reason`` says why, ``subject_id`` who (if known).

    ``subject_id`` is set only when the identity is trustworthy (a verified signature
    or a matching API key digest), never from an unverified token.
    """

    def __init__(self, reason: AuthFailureReason, *, subject_id: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown authentication failure reason {reason!r}")
        super().__init__(_MESSAGES[reason], reason=reason)
        self.reason: AuthFailureReason = reason
        self.subject_id = subject_id

    def __repr__(self) -> str:
        return f"AgentAuthError(reason={self.reason!r})"


def token_fingerprint(token: str) -> str:
    """A short sha256 prefix of a credential, safe for logs; never the credential itself."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX_CHARS]
