"""The stdout sink: JSON lines to standard output, flushed per batch, for log shippers.

Not durable beyond the pipe: ``record`` returns once the bytes are handed to the pipe and
flushed, not when the shipper has stored them. The chain starts at genesis on every start
(the writer id and checkpoints tell runs apart), so verify each run's stream separately.
Use it only when a shipper with its own delivery guarantees reads the stream.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from mcp_fhir.audit.chain import ChainHead, canonical_json
from mcp_fhir.audit.sinks.base import AuditSink, Opened

__all__ = ["StdoutSink"]


class StdoutSink(AuditSink):
    """JSON lines to a text stream (stdout by default)."""

    name = "stdout"
    durable = False

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream

    async def open(self) -> Opened:
        return Opened(head=ChainHead())

    def _out(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    async def append(self, entries: list[dict[str, Any]]) -> None:
        text = "".join(canonical_json(e).decode() + "\n" for e in entries)
        await asyncio.to_thread(self._write, text)

    def _write(self, text: str) -> None:
        out = self._out()
        out.write(text)
        out.flush()
        self.commit_count += 1

    async def check(self) -> bool:
        return not self._out().closed

    async def close(self) -> None:
        return None

    def reverse_reader(self) -> Iterator[dict[str, Any]]:
        return iter(())  # the stream is gone; every run starts a new chain
