"""Per-subject sliding-window counters, passed to the policy as `input.context.activity`.

Python decides nothing here: it counts, for each subject, the calls, the distinct patients and the
denials in each configured window, and the policy (`policies/mcp_fhir/authz/anomalies.rego`) raises
`bulk_access`, `denial_burst` or a deny on thresholds kept in its data.

    ActivityCounters (Protocol)
    ├── MemoryActivity   one process (the default)
    └── RedisActivity    shared by replicas: one sorted set per subject and kind, trimmed on every call

`observe(subject, patient)` counts the call being decided (so the 21st distinct patient is in the count its
own decision sees) and returns the snapshot:

    {"600": {"calls": 31, "distinct_patients": 21, "denials": 0}, "60": {...}}

keyed by window length in seconds. `denied(subject)` counts a denial for later decisions. Patient ids are
kept only as a keyed hash (never the id itself), and only for as long as the longest window.

Hand-written on purpose: `limits` (the rate-limit library) answers "is this over a limit", not "how many
distinct patients in this window", and a Redis sorted set per subject is the whole of the shared store.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["DEFAULT_WINDOWS", "ActivityCounters", "MemoryActivity", "RedisActivity"]

DEFAULT_WINDOWS: tuple[int, ...] = (60, 600)
Snapshot = dict[str, dict[str, int]]


class ActivityCounters(Protocol):
    async def observe(self, subject: str, patient: str | None) -> Snapshot: ...
    async def denied(self, subject: str) -> None: ...
    async def aclose(self) -> None: ...


def _windows(windows: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(w) for w in windows}))
    if not out or out[0] <= 0:
        raise ValueError("activity windows must be positive whole seconds")
    return out


class _Window:
    """One subject's calls, patients and denials in one window, kept as running counts (O(1) a call)."""

    __slots__ = ("calls", "denials", "patients", "seconds")

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.calls: deque[tuple[float, str | None]] = deque()
        self.patients: Counter[str] = Counter()
        self.denials: deque[float] = deque()

    def trim(self, now: float) -> None:
        horizon = now - self.seconds
        while self.calls and self.calls[0][0] <= horizon:
            _, patient = self.calls.popleft()
            if patient is not None:
                self.patients[patient] -= 1
                if not self.patients[patient]:
                    del self.patients[patient]
        while self.denials and self.denials[0] <= horizon:
            self.denials.popleft()

    def counts(self) -> dict[str, int]:
        return {
            "calls": len(self.calls),
            "distinct_patients": len(self.patients),
            "denials": len(self.denials),
        }


class MemoryActivity:
    """Counters in this process; each window keeps running counts, bounded by its own length."""

    def __init__(
        self, windows: Sequence[int] = DEFAULT_WINDOWS, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.windows = _windows(windows)
        self._clock = clock
        self._subjects: dict[str, tuple[_Window, ...]] = {}

    def _of(self, subject: str, now: float) -> tuple[_Window, ...]:
        windows = self._subjects.get(subject)
        if windows is None:
            windows = self._subjects[subject] = tuple(_Window(w) for w in self.windows)
        for window in windows:
            window.trim(now)
        return windows

    async def observe(self, subject: str, patient: str | None) -> Snapshot:
        now = self._clock()
        out: Snapshot = {}
        for window in self._of(subject, now):
            window.calls.append((now, patient))
            if patient is not None:
                window.patients[patient] += 1
            out[str(window.seconds)] = window.counts()
        return out

    async def denied(self, subject: str) -> None:
        now = self._clock()
        for window in self._of(subject, now):
            window.denials.append(now)

    async def aclose(self) -> None:
        return None


class RedisActivity:
    """Counters shared by replicas through Redis sorted sets (`redis.asyncio`)."""

    def __init__(
        self,
        client: Any,
        windows: Sequence[int] = DEFAULT_WINDOWS,
        *,
        prefix: str = "mcp-fhir:activity",
        key: bytes = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.windows = _windows(windows)
        self._redis = client
        self._prefix = prefix
        self._key = key or uuid.uuid4().bytes  # per deployment in config; random keeps a lone process private
        self._clock = clock

    def _k(self, subject: str, kind: str) -> str:
        sid = hashlib.sha256(subject.encode()).hexdigest()[:32]
        return f"{self._prefix}:{sid}:{kind}"

    def _patient(self, patient: str) -> str:
        return hmac.new(self._key, patient.encode(), hashlib.sha256).hexdigest()[:32]

    async def observe(self, subject: str, patient: str | None) -> Snapshot:
        now = self._clock()
        horizon = now - self.windows[-1]
        ttl = self.windows[-1] + 1
        calls, patients, denials = (self._k(subject, k) for k in ("calls", "patients", "denials"))
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(calls, {uuid.uuid4().hex: now})
        if patient is not None:
            pipe.zadd(patients, {self._patient(patient): now})
        for key in (calls, patients, denials):
            pipe.zremrangebyscore(key, "-inf", horizon)
            pipe.expire(key, int(ttl))
        for w in self.windows:
            since = f"({now - w}"
            pipe.zcount(calls, since, "+inf")
            pipe.zcount(patients, since, "+inf")
            pipe.zcount(denials, since, "+inf")
        results = await pipe.execute()
        counts = results[-3 * len(self.windows) :]
        return {
            str(w): {
                "calls": int(counts[3 * i]),
                "distinct_patients": int(counts[3 * i + 1]),
                "denials": int(counts[3 * i + 2]),
            }
            for i, w in enumerate(self.windows)
        }

    async def denied(self, subject: str) -> None:
        key = self._k(subject, "denials")
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(key, {uuid.uuid4().hex: self._clock()})
        pipe.expire(key, int(self.windows[-1] + 1))
        await pipe.execute()

    async def aclose(self) -> None:
        return None
