"""The real `PolicyEngine`: OPA's REST API through opa-python-client's async client.

One long-lived aiohttp session (the client used as an async context manager), an explicit
timeout on every decision, and no retries on the decision path: a retry would hide an
outage and stretch the caller's latency. Every lower-level failure is translated here,
in `_translate`, into a `PolicyError` leaf with a distinct code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client.opa_async import AsyncOpaClient

from mcp_fhir._exceptions import ConfigError, PolicyError, PolicyMalformed, PolicyTimeout, PolicyUnavailable
from mcp_fhir._secret import Secret
from mcp_fhir.policy.engine import Decision

DEFAULT_DECISION_TIMEOUT = 0.5  # seconds; a decision that takes longer is a deny
DEFAULT_HEALTH_TIMEOUT = 2.0
DECISION_PACKAGE = "mcp_fhir.authz"
DECISION_RULE = "decision"
VISIBLE_TOOLS_RULE = "visible_tools"


@dataclass(frozen=True, slots=True)
class OpaSettings:
    """Where OPA is and how long we wait for it. The bearer token is a `Secret`: reprs show `[secret]`."""

    url: str
    decision_timeout: float = DEFAULT_DECISION_TIMEOUT
    token: Secret | None = None
    package: str = DECISION_PACKAGE
    provenance: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.token, str):
            object.__setattr__(self, "token", Secret(self.token) if self.token else None)
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("opa.url", "must be an http(s) URL with a host")
        if parts.path not in ("", "/"):
            raise ConfigError("opa.url", "must be OPA's base URL, without a path")
        if not 0 < self.decision_timeout <= 30:
            raise ConfigError("opa.decision_timeout", "must be between 0 and 30 seconds")


@contextmanager
def _translate(decision_id: str | None = None) -> Iterator[None]:
    """The one seam where OPA transport errors become `PolicyError` leaves."""
    try:
        yield
    except PolicyError:
        raise
    except TimeoutError as exc:
        raise PolicyTimeout("OPA did not answer within the decision timeout") from exc
    except (aiohttp.ContentTypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyMalformed("OPA answered with a body that is not JSON", decision_id=decision_id) from exc
    except aiohttp.ClientResponseError as exc:
        raise PolicyUnavailable(f"OPA answered HTTP {exc.status}", decision_id=decision_id) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise PolicyUnavailable("OPA could not be reached") from exc


class OpaPolicyEngine:
    """Decisions from a real OPA server. Use as an async context manager; it owns one session."""

    def __init__(self, settings: OpaSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        self._client = AsyncOpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            token=settings.token.reveal() if settings.token else None,
            retries=0,  # never retry silently on the decision path
            timeout=settings.decision_timeout,
        )
        self._params = {"provenance": "true"} if settings.provenance else None
        self.last_revision: str | None = None

    async def __aenter__(self) -> OpaPolicyEngine:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close_connection()

    async def _query(self, rule: str, input_data: Mapping[str, Any]) -> Any:
        with _translate():
            async with asyncio.timeout(self.settings.decision_timeout):
                return await self._client.query_rule(
                    dict(input_data),
                    package_path=self.settings.package,
                    rule_name=rule,
                    query_params=self._params,
                )

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision:
        """Ask OPA for `data.mcp_fhir.authz.decision`. Raises a `PolicyError` leaf on any failure."""
        body = await self._query(DECISION_RULE, decision_input)
        decision_id = body.get("decision_id") if isinstance(body, Mapping) else None
        revision = _revision(body)
        if revision:
            self.last_revision = revision
        return Decision.parse(body, decision_id=decision_id, revision=revision)

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]:
        """Ask OPA for `visible_tools`. Anything off-contract hides every tool (fail closed)."""
        body = await self._query(VISIBLE_TOOLS_RULE, subject_input)
        result = body.get("result") if isinstance(body, Mapping) else None
        if not isinstance(result, list) or not all(isinstance(t, str) for t in result):
            raise PolicyMalformed("visible_tools is not a list of tool names")
        return frozenset(result)

    async def policy_data(self, path: str) -> Any:
        """The document at `data.<path>` (slash-separated), or None when it is undefined."""
        package, _, rule = path.replace("/", ".").rpartition(".")
        with _translate():
            async with asyncio.timeout(DEFAULT_HEALTH_TIMEOUT):
                body = await self._client.query_rule({}, package_path=package, rule_name=rule)
        return body.get("result") if isinstance(body, Mapping) else None

    async def active_revision(self) -> str | None:
        """The active bundle revisions from OPA's status API, or None when OPA runs from files."""
        try:
            with _translate():
                async with asyncio.timeout(DEFAULT_HEALTH_TIMEOUT):
                    status = await self._client.get_status()
        except PolicyError:
            return None
        bundles = ((status or {}).get("result") or {}).get("bundles") or {}
        revisions = sorted(str(b["active_revision"]) for b in bundles.values() if b.get("active_revision"))
        return ",".join(revisions) or None

    async def healthy(self) -> bool:
        """OPA's /health answered 200 (plugins and bundles included when configured)."""
        try:
            with _translate():
                async with asyncio.timeout(DEFAULT_HEALTH_TIMEOUT):
                    return bool(await self._client.check_health())
        except PolicyError:
            return False


def _revision(body: Any) -> str | None:
    """The bundle revision from OPA's provenance, when it runs from a bundle."""
    if not isinstance(body, Mapping):
        return None
    bundles = (body.get("provenance") or {}).get("bundles") or {}
    revisions = sorted(
        str(b.get("revision")) for b in bundles.values() if isinstance(b, Mapping) and b.get("revision")
    )
    return ",".join(revisions) or None
