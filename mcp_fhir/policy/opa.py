"""The real `PolicyEngine`: OPA's REST API, decisions on one long-lived aiohttp session.

An explicit timeout on every decision, and no retries on the decision path: a retry would
hide an outage and stretch the caller's latency. Every lower-level failure is translated
here, in `_translate`, into a `PolicyError` leaf with a distinct code.

Decisions go through opa-python-client's `query_rule` on its one aiohttp session. A plain
aiohttp POST of a pre-encoded body was measured beside it (`bench/opa_ab.py`, docs/performance.md)
and saved no CPU: the cost is aiohttp's request machinery and the loopback round trip, not the
wrapper, so the library stays.

The bundle revision recorded with each decision comes from OPA's status API
(`revision_from: status`, the default): read at start, then again in the background at most
every `revision_poll_s` seconds while decisions flow, so a bundle activation shows within that
interval. Bundles OPA loaded from disk (`--bundle`), which the status API does not list, are
read once at start from one provenance probe. The status API needs OPA's status plugin
(`status.prometheus: true`, or a status service; the managed OPA turns it on): while it does
not answer, each decision asks `?provenance=true`, as `revision_from: provenance` always does
(exact per decision, at a cost on both sides). OPA's own decision log names the exact revision of
every decision either way, joined to the audit record by its decision id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from opa_client.opa_async import AsyncOpaClient

from mcp_fhir._exceptions import ConfigError, PolicyError, PolicyMalformed, PolicyTimeout, PolicyUnavailable
from mcp_fhir._secret import Secret
from mcp_fhir.policy.engine import Decision

DEFAULT_DECISION_TIMEOUT = 0.5  # seconds; a decision that takes longer is a deny
DEFAULT_HEALTH_TIMEOUT = 2.0
_PROVENANCE = {"provenance": "true"}
DEFAULT_REVISION_POLL = 5.0  # seconds between status checks of the bundle revision, while decisions flow
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
    revision_from: Literal["status", "provenance"] = "status"
    revision_poll_s: float = DEFAULT_REVISION_POLL

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
        if self.revision_from not in ("status", "provenance"):
            raise ConfigError("opa.revision_from", "must be status or provenance")
        if not 0 < self.revision_poll_s <= 3600:
            raise ConfigError("opa.revision_poll_s", "must be between 0 and 3600 seconds")


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


log = logging.getLogger("mcp_fhir.policy.opa")


class OpaPolicyEngine:
    """Decisions from a real OPA server. Use as an async context manager; it owns one session."""

    def __init__(self, settings: OpaSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        token = settings.token.reveal() if settings.token else None
        self._client = AsyncOpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            token=token,
            retries=0,  # never retry silently
            timeout=settings.decision_timeout,
        )
        # True while each decision asks for its provenance: `revision_from: provenance`, or `status`
        # while OPA's status API does not answer (no status plugin): then the revision still comes back.
        self._by_provenance = settings.revision_from == "provenance"
        self._local_revision: str | None = None
        self.last_revision: str | None = None
        self._status_checked = 0.0
        self._refresh: asyncio.Task[bool] | None = None

    def __repr__(self) -> str:
        return f"OpaPolicyEngine(url={self.settings.url!r}, revision_from={self.settings.revision_from!r})"

    @property
    def current_revision(self) -> str | None:
        """The active bundle revision as last learnt (None when OPA runs from files, or before it is known)."""
        return self.last_revision

    async def __aenter__(self) -> OpaPolicyEngine:
        await self._client.__aenter__()
        if self.settings.revision_from == "status":
            await self._probe_local_revision()
        if self.settings.revision_from == "status" and not await self._refresh_revision():
            self._by_provenance = True
            log.warning(
                "OPA's status API did not answer (is its status plugin on?): "
                "each decision asks for its provenance until it does"
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        await self._client.close_connection()

    async def _query(self, rule: str, input_data: Mapping[str, Any], *, provenance: bool = False) -> Any:
        with _translate():
            async with asyncio.timeout(self.settings.decision_timeout):
                return await self._client.query_rule(
                    dict(input_data),
                    package_path=self.settings.package,
                    rule_name=rule,
                    query_params=_PROVENANCE if provenance else None,
                )

    async def evaluate(self, decision_input: Mapping[str, Any]) -> Decision:
        """Ask OPA for `data.mcp_fhir.authz.decision`. Raises a `PolicyError` leaf on any failure."""
        by_provenance = self._by_provenance
        body = await self._query(DECISION_RULE, decision_input, provenance=by_provenance)
        decision_id = body.get("decision_id") if isinstance(body, Mapping) else None
        if by_provenance:
            revision = _revision(body)
            if revision:
                self.last_revision = revision
        else:
            revision = self.last_revision
        if self.settings.revision_from == "status":
            self._maybe_refresh()
        return Decision.parse(body, decision_id=decision_id, revision=revision)

    async def visible_tools(self, subject_input: Mapping[str, Any]) -> frozenset[str]:
        """Ask OPA for `visible_tools`. Anything off-contract hides every tool (fail closed)."""
        body = await self._query(VISIBLE_TOOLS_RULE, subject_input)
        result = body.get("result") if isinstance(body, Mapping) else None
        if not isinstance(result, list) or not all(isinstance(t, str) for t in result):
            raise PolicyMalformed("visible_tools is not a list of tool names")
        return frozenset(result)

    def _maybe_refresh(self) -> None:
        """Check the bundle revision again in the background, at most every `revision_poll_s` seconds."""
        now = time.monotonic()
        if now - self._status_checked < self.settings.revision_poll_s:
            return
        if self._refresh is not None and not self._refresh.done():
            return
        self._status_checked = now
        self._refresh = asyncio.create_task(self._refresh_revision())

    async def _probe_local_revision(self) -> None:
        """Once, at start: the revision of bundles OPA loaded from disk (`--bundle`), which its status API omits.

        One query of an undefined rule with `?provenance=true` (one event in OPA's decision log, path
        `<package>/_revision_probe`). A bundle on disk changes only when OPA restarts (or under `--watch`,
        which this cannot see: restart the sidecar with OPA, or use `revision_from: provenance`).
        """
        try:
            body = await self._query("_revision_probe", {}, provenance=True)
        except PolicyError:
            return
        self._local_revision = _revision(body)

    async def _refresh_revision(self) -> bool:
        """The revision from /v1/status. Unanswered, the last one known is kept (and False returned)."""
        self._status_checked = time.monotonic()
        try:
            self.last_revision = await self._status_revision() or self._local_revision
        except PolicyError as exc:
            if not self._by_provenance:
                log.warning(
                    "OPA's status API did not answer; the last bundle revision is kept",
                    extra={"code": exc.code},
                )
            return False
        self._by_provenance = False
        return True

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
            return await self._status_revision()
        except PolicyError:
            return None

    async def _status_revision(self) -> str | None:
        with _translate():
            async with asyncio.timeout(DEFAULT_HEALTH_TIMEOUT):
                status = await self._client.get_status()
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
