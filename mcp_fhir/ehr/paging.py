"""Where a search continues: the EHR's next link, a position inside a page, or the HL7 v2 results after it.

The tools hand the EHR client's ``FetchResult.next_url`` back to it as ``next_url`` on the next call (signed
and bound to the tool and patient by ``tools/results.py``). Most of the time that is the EHR's own ``next``
link. It is a *cursor* when the EHR client must remember more than a link:

* the EHR answered with more resources than ``page_size`` (some ignore ``_count``): the page is trimmed and the
  cursor says which upstream page to read again (the cache usually answers) and how many of it to skip;
* the search also draws on the backend's HL7 v2 results: once the EHR has no next page, the cursor says how
  far into the (filtered, ordered) HL7 v2 results the next page starts, and it carries the search parameters
  so every page applies the same filters.

A cursor is a URL under the backend's base (``<base>/_mcp-fhir-cursor/<base64url JSON>``), so it passes the
same "inside the backend" check as an EHR link; it is never sent to the EHR. Its fields are checked on the way
in: a malformed cursor is an ``UpstreamBadResponse``, like a link that leaves the backend.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcp_fhir._exceptions import UpstreamBadResponse

CURSOR_SEGMENT = "_mcp-fhir-cursor"
MAX_CURSOR_CHARS = 8192
MAX_OFFSET = 1_000_000


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in a search: an upstream page (``upstream`` link, or the first page when None) and an offset."""

    query: dict[str, str | list[str]] = field(default_factory=dict)
    upstream: str | None = None  # the EHR link of the current upstream page; None: the first page of `query`
    count: int = 50  # the _count the first page was asked with (to read the same page again)
    skip: int = 0  # resources of the upstream page already returned
    hl7: int | None = None  # None: still on the EHR's pages; else the offset into the HL7 v2 results
    total: int | None = None  # the EHR's total, when it said

    def encode(self, base_url: str) -> str:
        data: dict[str, Any] = {"q": self.query, "c": self.count, "k": self.skip}
        if self.upstream is not None:
            data["u"] = self.upstream
        if self.hl7 is not None:
            data["h"] = self.hl7
        if self.total is not None:
            data["t"] = self.total
        raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
        return f"{base_url}/{CURSOR_SEGMENT}/{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"


def is_cursor(base_url: str, url: str) -> bool:
    return url.startswith(f"{base_url}/{CURSOR_SEGMENT}/")


def _offset(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_OFFSET:
        raise UpstreamBadResponse("a continuation is malformed")
    return value


def _query(value: Any) -> dict[str, str | list[str]]:
    if not isinstance(value, Mapping):
        raise UpstreamBadResponse("a continuation is malformed")
    out: dict[str, str | list[str]] = {}
    for key, item in value.items():
        if isinstance(item, str):
            out[str(key)] = item
        elif isinstance(item, Sequence) and all(isinstance(v, str) for v in item):
            out[str(key)] = list(item)
        else:
            raise UpstreamBadResponse("a continuation is malformed")
    return out


def read_cursor(base_url: str, url: str) -> Cursor:
    """The cursor `url` stands for (call :func:`is_cursor` first)."""
    token = url[len(f"{base_url}/{CURSOR_SEGMENT}/") :]
    if not token or len(token) > MAX_CURSOR_CHARS:
        raise UpstreamBadResponse("a continuation is malformed")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise UpstreamBadResponse("a continuation is malformed") from exc
    if not isinstance(data, Mapping):
        raise UpstreamBadResponse("a continuation is malformed")
    upstream = data.get("u")
    if upstream is not None and not isinstance(upstream, str):
        raise UpstreamBadResponse("a continuation is malformed")
    count = _offset(data.get("c", 50))
    hl7 = data.get("h")
    total = data.get("t")
    return Cursor(
        query=_query(data.get("q", {})),
        upstream=upstream,
        count=max(1, count),
        skip=_offset(data.get("k", 0)),
        hl7=None if hl7 is None else _offset(hl7),
        total=None if total is None else _offset(total),
    )
