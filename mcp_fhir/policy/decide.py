"""Step 4 of the call path, in one place: a typed input in, a typed decision out, failing closed.

    DecisionInput ──▶ engine.evaluate ──▶ Decision            (the active policy: gates the call)
                  └─▶ candidate.evaluate, in the background    (shadow: recorded, never enforced)

`Decider.decide` asks the active engine and returns its decision; any failure of the engine
(even a bug) is a deny with its own reason code. A tool may require obligations that only its
decisions carry (`search_audit_log` needs `audit_patients`); an allow without them is
`opa_malformed`, a deny.

Shadow mode costs no latency: the candidate (shadow) engine is asked in a background task
under its own timeout, and the call never waits for it. When the candidate answers, a
disagreement is counted and audited as `shadow_divergence`; when it does not answer in time
it is counted (`kind="shadow_timeout"`) and audited as a `shadow_divergence` record whose
`extra.divergence` is `shadow_timeout`. A candidate that fails in any other way is a
candidate deny, compared like any other answer. `aclose()` waits for the candidates still
in flight (bounded by their timeout).

The optional decision cache (`DecisionCache`, setting `opa.decision_cache`, off by default)
reuses a decision only under all of these:
- the key is the active bundle revision plus the canonical input (sorted keys, compact JSON)
  without `context.request_id` and `context.time`: the same subject, claims, scopes, tool,
  patient, parameters, purpose, break-glass reason and backend;
- the lifetime is the policy's own: `decision.valid_for_s` seconds from the input's
  `context.time` (the instant the policy decided for). A decision without it, without a
  decision id, or from a failure (a fail-closed deny) is never stored;
- a reused decision keeps its decision id and says `cache="hit"`: the call path writes the
  call's own audit record as ever, naming that decision id and `decision_cache: hit`;
- off, nothing changes: no key is computed, and decisions and records are as without it.
OPA is not asked on a hit, so OPA's decision log has one event per *evaluation*, not per call:
the audit trail (one record per call) joins its hits to that event by the decision id.
A hand-written LRU (an `OrderedDict`): no library gives an expiry per entry from the value
and a key from canonical JSON with two fields left out, in this little code.

`visible_tools` asks the active engine which tools a subject may see. Any failure hides every
tool (fail closed) and is logged with its code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

from mcp_fhir import metrics
from mcp_fhir._exceptions import PolicyError, PolicyMalformed, PolicyTimeout, PolicyUnavailable
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.policy.engine import Decision, PolicyEngine
from mcp_fhir.policy.input import DecisionInput, visible_tools_input

__all__ = [
    "DEFAULT_SHADOW_TIMEOUT",
    "SHADOW_TIMEOUT",
    "Decider",
    "DecisionCache",
    "cache_key",
    "evaluate_failing_closed",
]

log = logging.getLogger("mcp_fhir.decide")

DEFAULT_SHADOW_TIMEOUT = 0.5  # seconds; a candidate slower than this is a `shadow_timeout`
SHADOW_TIMEOUT = "shadow_timeout"

AuditWriter = Callable[[AuditRecord], Awaitable[object]]


async def evaluate_failing_closed(engine: PolicyEngine, decision_input: Mapping[str, Any]) -> Decision:
    """`engine.evaluate`, where every failure (even an engine bug) is a deny with its own reason code."""
    try:
        return await engine.evaluate(decision_input)
    except PolicyError as exc:
        return Decision.denied_by(exc)
    except Exception as exc:  # an engine bug must deny, never allow, and never break the call path
        log.error("policy engine failed unexpectedly: %s", type(exc).__name__)
        return Decision.denied_by(PolicyUnavailable("the policy engine failed"))


DEFAULT_CACHE_ENTRIES = 10_000
_NOT_IN_KEY = ("request_id", "time")


def cache_key(revision: str | None, opa_input: Mapping[str, Any]) -> str:
    """The bundle revision plus the canonical input without the request id and the time."""
    context = opa_input.get("context")
    if isinstance(context, Mapping):
        opa_input = {**opa_input, "context": {k: v for k, v in context.items() if k not in _NOT_IN_KEY}}
    canonical = json.dumps(opa_input, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"{revision or ''}\n{canonical}"


def _instant(opa_input: Mapping[str, Any]) -> datetime | None:
    """The input's `context.time`, the instant the policy decides for, or None when it is not a time."""
    value = (opa_input.get("context") or {}).get("time")
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return at if at is not None and at.tzinfo is not None else None


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    decision: Decision
    decided_at: datetime
    expires_at: datetime


class DecisionCache:
    """Decisions by `cache_key`, each for the `valid_for_s` its policy gave it; at most `max_entries`."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"DecisionCache(entries={len(self._entries)}, hits={self.hits}, misses={self.misses})"

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, at: datetime) -> Decision | None:
        """The decision stored under `key` if `at` lies in its lifetime, else None (and it is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.decided_at <= at < entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.decision

    def put(self, key: str, decision: Decision, at: datetime) -> bool:
        """Store `decision` for its `valid_for_s` from `at`. Only a policy's answer with a lifetime and an id."""
        if not decision.valid_for_s or not decision.decision_id:
            return False
        self._entries[key] = _Entry(decision, at, at + timedelta(seconds=decision.valid_for_s))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def clear(self) -> None:
        self._entries.clear()


class Decider:
    """Asks the active policy for every decision; asks the candidate policy on the side."""

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        audit: AuditWriter,
        candidate: PolicyEngine | None = None,
        shadow_timeout: float = DEFAULT_SHADOW_TIMEOUT,
        cache: DecisionCache | None = None,
    ) -> None:
        self.engine = engine
        self.candidate = candidate
        self.shadow_timeout = shadow_timeout
        self.cache = cache
        self._audit = audit
        self._in_flight: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"Decider(shadow={self.candidate is not None}, cache={self.cache is not None}, "
            f"in_flight={len(self._in_flight)})"
        )

    async def decide(self, decision_input: DecisionInput, *, requires: Collection[str] = ()) -> Decision:
        """The active decision for `decision_input`. Never raises: a failure is a deny with its code."""
        opa_input = decision_input.to_opa()
        started = time.perf_counter()
        if self.cache is None:
            decision = await evaluate_failing_closed(self.engine, opa_input)
        else:
            decision = await self._cached(self.cache, opa_input)
        if decision.allow and (missing := sorted(set(requires) - decision.obligations.present)):
            # An allow without an obligation this tool needs could widen access: fail closed.
            decision = Decision.denied_by(
                PolicyMalformed(
                    "an allow is missing obligations: " + ", ".join(missing), decision_id=decision.decision_id
                )
            )
        metrics.DECISION_LATENCY.observe(time.perf_counter() - started)
        result = "allow" if decision.allow else "deny"
        for code in decision.reason_codes or ("none",):
            metrics.DECISIONS.labels(result, code).inc()
        if self.candidate is not None:
            task = asyncio.create_task(self._shadow(self.candidate, opa_input, decision))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return decision

    def forget_decisions(self) -> None:
        """Drop every cached decision (on a policy reload: files read again keep their revision)."""
        if self.cache is not None:
            self.cache.clear()

    async def _cached(self, cache: DecisionCache, opa_input: Mapping[str, Any]) -> Decision:
        """The decision from the cache when it holds one for this input and instant, else from the engine."""
        revision: str | None = getattr(self.engine, "current_revision", None)
        key = cache_key(revision, opa_input)
        at = _instant(opa_input)
        if at is not None and (hit := cache.get(key, at)) is not None:
            cache.hits += 1
            return dataclasses.replace(hit, cache="hit")
        cache.misses += 1
        decision = await evaluate_failing_closed(self.engine, opa_input)
        if at is not None and decision.revision == revision:
            cache.put(key, decision, at)
        return dataclasses.replace(decision, cache="miss")

    async def visible_tools(self, subject: Subject, *, backend: str) -> frozenset[str]:
        """The tools the policy lets `subject` see. Any failure hides every tool, logged with its code."""
        try:
            return await self.engine.visible_tools(visible_tools_input(subject, backend=backend))
        except PolicyError as exc:
            log.warning("visible_tools failed closed: every tool hidden", extra={"code": exc.code})
        except Exception as exc:
            log.error(
                "visible_tools failed closed on an engine bug (%s): every tool hidden",
                type(exc).__name__,
                extra={"code": PolicyUnavailable.code},
            )
        return frozenset()

    async def aclose(self) -> None:
        """Wait for the candidates still in flight; each is bounded by the shadow timeout."""
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def wait_for_shadow(self) -> None:
        """For tests and shutdown: every candidate asked so far has been recorded."""
        await self.aclose()

    async def _shadow(self, candidate: PolicyEngine, opa_input: Mapping[str, Any], active: Decision) -> None:
        try:
            try:
                async with asyncio.timeout(self.shadow_timeout):
                    answer = await candidate.evaluate(opa_input)
            except (TimeoutError, PolicyTimeout):
                metrics.SHADOW_DIVERGENCES.labels(SHADOW_TIMEOUT).inc()
                await self._audit(_shadow_record(opa_input, active, SHADOW_TIMEOUT, candidate=None))
                return
            except PolicyError as exc:
                answer = Decision.denied_by(exc)
            except Exception as exc:  # a broken candidate is a candidate deny, never a broken call
                log.error("candidate policy engine failed unexpectedly: %s", type(exc).__name__)
                answer = Decision.denied_by(PolicyUnavailable("the candidate policy engine failed"))
            if (answer.allow, answer.obligations) == (active.allow, active.obligations):
                return
            kind = (
                "widening"
                if answer.allow and not active.allow
                else ("narrowing" if active.allow and not answer.allow else "obligations")
            )
            metrics.SHADOW_DIVERGENCES.labels(kind).inc()
            await self._audit(_shadow_record(opa_input, active, kind, candidate=answer))
        except Exception as exc:  # off the response path: nothing here may reach a caller
            log.error("the shadow record could not be written: %s", type(exc).__name__)


def _shadow_record(
    opa_input: Mapping[str, Any], active: Decision, kind: str, *, candidate: Decision | None
) -> AuditRecord:
    ctx = opa_input.get("context") or {}
    action = opa_input.get("action") or {}
    extra: dict[str, Any] = {"divergence": kind}
    if candidate is not None:
        extra["candidate"] = {
            "allow": candidate.allow,
            "reasons": list(candidate.reason_codes),
            "obligations": candidate.obligations.to_dict(),
        }
    return AuditRecord(
        ts=utc_now_ms(),
        request_id=str(ctx.get("request_id", "")),
        kind="shadow_divergence",
        result="allowed" if active.allow else "denied",
        tool=action.get("tool"),
        resource_type=action.get("resource_type"),
        operation=action.get("operation"),
        subject_id=(opa_input.get("subject") or {}).get("id"),
        reason_codes=active.reason_codes,
        decision_id=active.decision_id,
        policy_revision=active.revision,
        extra=extra,
    )
