"""Alerts: the policy's ``audit.alerts`` and the sidecar's own denial-burst detector.

Design: one record per call. ``AuditTrail.record`` hands every record to ``AlertEmitter.annotate``,
which returns it with its alerts in its own ``alerts`` field: the policy's alerts (already there,
from the decision) and ``denial_burst`` when this record completes a burst. No separate record is
written for an alert raised by a call, so an after-hours call writes exactly one record, and
``mcp-fhir audit query --alert NAME`` / the ``search_audit_log`` tool find it by that field. Each
alert is also counted (``mcp_fhir_alerts_total{alert}``) and logged (one line per alert, with the
alert name, tool and result, never the patient). The server therefore only calls
``AuditTrail.record``; it never calls the emitter itself.

Separate ``kind="alert"`` records remain only for alerts that no one call raised: the trail's own
``audit_recovery`` (``trail.py``). Shadow-policy disagreements are their own kind
(``shadow_divergence``, ``mcp_fhir/policy/decide.py``).

Python does not decide which events are alarming: alert names come from the policy. The one
built-in is arithmetic, not policy: ``denial_burst`` fires when one agent collects
``threshold`` denials within ``window_seconds``, at most once per window per agent; it is added to
the record of the denial that completes the burst.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from mcp_fhir import metrics
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.audit.settings import DEFAULT_DENIAL_BURST_THRESHOLD, DEFAULT_DENIAL_BURST_WINDOW_SECONDS

__all__ = ["DENIAL_BURST", "AlertEmitter", "DenialBurstDetector"]

log = logging.getLogger(__name__)

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
    """Puts a record's alerts inside it (adding ``denial_burst`` when due), and counts and logs each."""

    def __init__(self, burst: DenialBurstDetector | None = None) -> None:
        self._burst = burst or DenialBurstDetector()

    def annotate(self, rec: AuditRecord) -> AuditRecord:
        """``rec`` with every alert it raises in its ``alerts`` field; each alert counted and logged once.

        A ``kind="alert"`` record is returned unchanged: it is an alert already, not a call.
        """
        if rec.kind == "alert":
            return rec
        alerts = rec.alerts
        sidecar: tuple[str, ...] = ()
        if rec.result == "denied" and self._burst.observe(rec.subject_id or ANONYMOUS_AGENT):
            sidecar = (DENIAL_BURST,)
            alerts = (*alerts, DENIAL_BURST) if DENIAL_BURST not in alerts else alerts
        for name in rec.alerts:
            self._raise(name, "policy", rec)
        for name in sidecar:
            self._raise(name, "sidecar", rec)
        return dataclasses.replace(rec, alerts=alerts) if alerts != rec.alerts else rec

    @staticmethod
    def _raise(name: str, source: str, rec: AuditRecord) -> None:
        label = name if _ALERT_NAME.match(name) else "invalid_alert_name"
        metrics.AUDIT_ALERTS.labels(alert=label).inc()
        log.log(
            logging.WARNING if source == "sidecar" else logging.INFO,
            "audit alert %s (%s) on a %s %s record",
            label, source, rec.result, rec.kind,
            extra={"alert": label, "tool": rec.tool, "result": rec.result},
        )  # fmt: skip
