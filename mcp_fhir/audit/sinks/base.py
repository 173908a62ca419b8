"""The audit sink contract: append already-chained entries durably, and say where the chain stands.

A sink knows nothing of records, keys or policy. The trail chains, signs and encrypts;
the sink stores. ``append`` returns only when the entries are durable (fsync or COMMIT)
and raises any lower-level exception, which the trail translates once into
``AuditUnavailable``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mcp_fhir.audit.chain import ChainHead

__all__ = ["AuditSink", "Opened", "SinkError"]


class SinkError(Exception):
    """A sink could not do what was asked; the trail turns it into AuditUnavailable."""


@dataclass(slots=True)
class Opened:
    """What a sink found on (re)open: the chain head, and a recovery note if it cut a torn tail."""

    head: ChainHead
    recovery: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class AuditSink(ABC):
    """One storage backend for the chain."""

    name: str = "base"
    durable: bool = True

    def __init__(self) -> None:
        self.commit_count = 0  # how many durable commits (fsyncs / COMMITs) were made

    @abstractmethod
    async def open(self) -> Opened:
        """Open (or reopen after a failure) and return the head of the stored chain."""

    @abstractmethod
    async def append(self, entries: list[dict[str, Any]]) -> None:
        """Store ``entries`` (already chained, in order) and return only once they are durable."""

    @abstractmethod
    async def check(self) -> bool:
        """Could we write right now? Never raises."""

    @abstractmethod
    async def close(self) -> None:
        """Release the file, connection or lock."""

    def reader(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """A blocking iterator over stored entries with ``seq > after_seq``, in order (run it in a thread)."""
        raise SinkError(f"the {self.name} sink cannot be read back")

    def reverse_reader(self) -> Iterator[dict[str, Any]]:
        """Stored entries from the last one backwards (blocking). Recovery reads only as far as it needs."""
        return iter(reversed(list(self.reader())))
