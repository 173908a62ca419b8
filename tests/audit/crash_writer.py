"""Crash-test writer: append records under load and print each seq only after ``record`` returned.

Usage: python crash_writer.py LOG_PATH [WORKERS]. Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from mcp_fhir.audit.record import AuditRecord, utc_now_ms
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail


async def worker(trail, n: int) -> None:  # type: ignore[no-untyped-def]
    i = 0
    while True:
        i += 1
        rid = await trail.record(
            AuditRecord(ts=utc_now_ms(), request_id=f"w{n}-{i}", subject_id="agent", patient=f"pat-{i % 5}")
        )
        sys.stdout.write(rid.split(":")[0] + "\n")
        sys.stdout.flush()


async def main() -> None:
    path = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    trail = build_trail(AuditSettings(path=path, writer_id="crash"))
    await trail.start()
    await asyncio.gather(*(worker(trail, n) for n in range(workers)))


if __name__ == "__main__":
    asyncio.run(main())
