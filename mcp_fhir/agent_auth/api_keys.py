"""API keys for headless agents → ``Subject`` (``authn="api_key"``).

- A key is ``mfk_`` + 32 random bytes, urlsafe base64 (43 characters): recognisable in
  logs and secret scanners, and high-entropy, so one unsalted sha256 is enough.
- Configuration holds only ``sha256:<hex>`` of the full key, with the key's ``id``,
  ``claims``, ``scopes``, optional ``on_behalf_of`` and optional ``expires`` (a date,
  valid through the end of that day, UTC).
- Lookup compares the presented key's digest with *every* configured digest using
  ``hmac.compare_digest`` and never stops early, so timing reveals neither which key
  matched nor how many leading bytes did.
- Keys travel as ``Authorization: Bearer mfk_…`` only (so the SDK's bearer plumbing,
  401/403 and Protected Resource Metadata apply). An ``X-API-Key`` header is NOT read.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from typing import Final

from mcp_fhir.agent_auth.errors import AgentAuthError
from mcp_fhir.agent_auth.settings import ApiKeyEntry
from mcp_fhir.agent_auth.subject import Subject

__all__ = [
    "API_KEY_BYTES",
    "API_KEY_PREFIX",
    "ApiKeyStore",
    "generate_api_key",
    "hash_api_key",
    "is_api_key",
]

API_KEY_PREFIX: Final = "mfk_"
API_KEY_BYTES: Final = 32
MAX_API_KEY_CHARS: Final = 256
_HASH_PREFIX: Final = "sha256:"


def is_api_key(credential: str) -> bool:
    """Whether a presented credential is shaped like one of our API keys (by its prefix)."""
    return credential.startswith(API_KEY_PREFIX)


def hash_api_key(key: str) -> str:
    """The configuration form of a key: ``sha256:<hex>`` of the full key string."""
    return _HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> tuple[str, str]:
    """A fresh ``(key, hash)``: show the key once to its owner, put only the hash in config."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_BYTES)
    return key, hash_api_key(key)


def _utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class ApiKeyStore:
    """The configured keys; ``verify(key)`` is the one door."""

    def __init__(self, entries: Iterable[ApiKeyEntry], *, today: Callable[[], dt.date] = _utc_today) -> None:
        self._entries = tuple(entries)
        self._digests = tuple(bytes.fromhex(e.hash.removeprefix(_HASH_PREFIX)) for e in self._entries)
        self._today = today

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, key: str) -> Subject:
        """The key's ``Subject``; ``api_key_unknown`` or ``token_expired`` otherwise."""
        if not is_api_key(key) or len(key) > MAX_API_KEY_CHARS:
            raise AgentAuthError("api_key_unknown")
        presented = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        match: ApiKeyEntry | None = None
        for entry, digest in zip(self._entries, self._digests, strict=True):
            if hmac.compare_digest(presented, digest) and match is None:
                match = entry
        if match is None:
            raise AgentAuthError("api_key_unknown")
        if match.expires is not None and self._today() > match.expires:
            raise AgentAuthError("token_expired", subject_id=match.id)
        return Subject(
            id=match.id,
            authn="api_key",
            claims=copy.deepcopy(match.claims),
            scopes=match.scopes,
            on_behalf_of=match.on_behalf_of,
        )

    def expires_at(self, key_id: str) -> int | None:
        """Unix time at which a key stops being valid (the end of its ``expires`` day, UTC)."""
        for entry in self._entries:
            if entry.id == key_id and entry.expires is not None:
                end = dt.datetime.combine(entry.expires + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
                return int(end.timestamp())
        return None
