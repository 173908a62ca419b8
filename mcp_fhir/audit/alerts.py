"""Alerts: the policy's ``audit.alerts`` and the sidecar's own denial-burst detector.

Design: ``AuditTrail.record`` calls ``AlertEmitter.derive`` for every access record and
writes each alert as its own ``kind="alert"`` record in the SAME group-commit batch as the
access record, so the access record and its alerts become durable together (or fail together).
The server therefore only calls ``AuditTrail.record``; it never calls the emitter itself.

Python does not decide which events are alarming: alert names come from the policy. The one
built-in is arithmetic, not policy: ``denial_burst`` fires when one agent collects
``threshold`` denials within ``window_seconds``, at most once per window per agent.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from mcp_fhir import metrics
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.audit.settings import DEFAULT_DENIAL_BURST_THRESHOLD, DEFAULT_DENIAL_BURST_WINDOW_SECONDS

__all__ = ["DENIAL_BURST", "AlertEmitter", "DenialBurstDetector"]

DENIAL_BURST = "denial_burst"
MAX_TRACKED_AGENTS = 10_000
_ALERT_NAME = re.compile(r"^[a-z0-9_.:-]{1,64}$")
ANONYMOUS_AGENT = "-"


class DenialBurstDetector:
    """N denials within W seconds by one agent → one ``denial_burst`` per window. Injectable clock."""

    def __init__(
        self,
        threshold: int = DEFAULT_DENIAL_BURST_THRESHOLD,
        window_seconds: float = DEFAULT_DENIAL_BURST_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or window_seconds <= 0:
            raise ValueError("threshold must be >= 1 and window_seconds > 0")
        self.threshold = threshold
        self.window = window_seconds
        self._clock = clock
        self._denials: OrderedDict[str, deque[float]] = OrderedDict()
        self._fired_at: dict[str, float] = {}

    def observe(self, agent: str) -> bool:
        """Count one denial for ``agent``; True exactly when this denial completes a burst."""
        now = self._clock()
        times = self._denials.pop(agent, None) or deque()
        self._denials[agent] = times  # most recently seen last
        times.append(now)
        while times and now - times[0] >= self.window:
            times.popleft()
        while len(self._denials) > MAX_TRACKED_AGENTS:
            evicted, _ = self._denials.popitem(last=False)
            self._fired_at.pop(evicted, None)
        if len(times) < self.threshold:
            return False
        fired = self._fired_at.get(agent)
        if fired is not None and now - fired < self.window:
            return False
        self._fired_at[agent] = now
        return True


class AlertEmitter:
    """Turns an access record into zero or more ``kind="alert"`` records, and counts them."""

    def __init__(self, burst: DenialBurstDetector | None = None) -> None:
        self._burst = burst or DenialBurstDetector()

    def derive(self, rec: AuditRecord) -> list[AuditRecord]:
        """The alert records ``rec`` gives rise to (none for records that are alerts already)."""
        if rec.kind == "alert":
            return []
        raised = [(name, "policy") for name in rec.alerts]
        if rec.result == "denied" and self._burst.observe(rec.subject_id or ANONYMOUS_AGENT):
            raised.append((DENIAL_BURST, "sidecar"))
        out: list[AuditRecord] = []
        for name, source in raised:
            label = name if _ALERT_NAME.match(name) else "invalid_alert_name"
            metrics.AUDIT_ALERTS.labels(alert=label).inc()
            out.append(
                AuditRecord(
                    ts=rec.ts,
                    request_id=rec.request_id,
                    trace_id=rec.trace_id,
                    kind="alert",
                    result=rec.result,
                    subject_id=rec.subject_id,
                    on_behalf_of=rec.on_behalf_of,
                    authn=rec.authn,
                    tool=rec.tool,
                    resource_type=rec.resource_type,
                    operation=rec.operation,
                    patient=rec.patient,
                    backend=rec.backend,
                    purpose=rec.purpose,
                    reason_codes=rec.reason_codes,
                    alerts=(label,),
                    decision_id=rec.decision_id,
                    policy_revision=rec.policy_revision,
                    extra={"alert": label, "source": source, "of_kind": rec.kind},
                )
            )
        return out
