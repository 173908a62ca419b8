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

`visible_tools` asks the active engine which tools a subject may see. Any failure hides every
tool (fail closed) and is logged with its code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from mcp_fhir import metrics
from mcp_fhir._exceptions import PolicyError, PolicyMalformed, PolicyTimeout, PolicyUnavailable
from mcp_fhir.agent_auth.subject import Subject
from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.policy.engine import Decision, PolicyEngine
from mcp_fhir.policy.input import DecisionInput, visible_tools_input

__all__ = ["DEFAULT_SHADOW_TIMEOUT", "SHADOW_TIMEOUT", "Decider", "evaluate_failing_closed"]

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


class Decider:
    """Asks the active policy for every decision; asks the candidate policy on the side."""

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        audit: AuditWriter,
        candidate: PolicyEngine | None = None,
        shadow_timeout: float = DEFAULT_SHADOW_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.candidate = candidate
        self.shadow_timeout = shadow_timeout
        self._audit = audit
        self._in_flight: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Decider(shadow={self.candidate is not None}, in_flight={len(self._in_flight)})"

    async def decide(self, decision_input: DecisionInput, *, requires: Collection[str] = ()) -> Decision:
        """The active decision for `decision_input`. Never raises: a failure is a deny with its code."""
        opa_input = decision_input.to_opa()
        started = time.perf_counter()
        decision = await evaluate_failing_closed(self.engine, opa_input)
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
