"""The hash chain: canonical bytes, entry hashes and the chain head.

A stored entry is one JSON object. Every entry has ``seq`` (1, 2, 3 ... per writer),
``prev`` (the ``hash`` of the entry before it; 64 zeros for the first) and ``hash``:

    hash = sha256( canonical_json(entry without "hash") ).hexdigest()

Canonical JSON is sorted keys, no spaces, UTF-8, no NaN. Because the hash covers
the stored form, an encrypted entry (``kid``, ``nonce``, ``ct``) verifies without the key.

The body of an entry is exactly one of:

    {"record": {...}}                          a plaintext audit record
    {"kid": ..., "nonce": ..., "ct": ...}      an AES-256-GCM encrypted record
    {"checkpoint": {seq, hash, ts, writer}, "sig": ..., "pub": ...}
                                               a signed checkpoint over the entry before it
    {"recovery": {...}}                        the writer resumed after a torn, unacknowledged tail
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["GENESIS", "ChainHead", "canonical_json", "entry_hash", "entry_kind", "seal"]

GENESIS = "0" * 64


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash of an entry: sha256 over its canonical form without the ``hash`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def entry_kind(entry: dict[str, Any]) -> str:
    """``record``, ``encrypted``, ``checkpoint``, ``recovery`` or ``unknown``."""
    if "record" in entry:
        return "record"
    if "ct" in entry:
        return "encrypted"
    if "checkpoint" in entry:
        return "checkpoint"
    if "recovery" in entry:
        return "recovery"
    return "unknown"


@dataclass(slots=True)
class ChainHead:
    """Where the chain stands: the last sequence number and its hash."""

    seq: int = 0
    hash: str = GENESIS


def seal(head: ChainHead, body: dict[str, Any]) -> dict[str, Any]:
    """Link ``body`` after ``head``: add seq, prev and hash; advance ``head``; return the entry."""
    entry = {**body, "seq": head.seq + 1, "prev": head.hash}
    entry["hash"] = entry_hash(entry)
    head.seq = entry["seq"]
    head.hash = entry["hash"]
    return entry
