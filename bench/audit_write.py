"""Measure the durable audit write: ``python -m bench.audit_write [--n N] [--concurrency C]``.

Times each ``AuditTrail.record()`` call on a file sink in a fresh temporary directory, first
N calls one at a time, then N calls issued C at a time, and prints mean / p50 / p99 in
milliseconds plus the number of durable commits (fsyncs) the sink made. Every commit ends with a
signed checkpoint, so it also prints what that costs: one Ed25519 signature (timed alone) and the
trail's bytes per record. It also times a bare ``os.fsync`` of one appended line on the same disk,
the floor a single durable write cannot beat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from mcp_fhir.audit.crypto import CheckpointSigner
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.audit.settings import AuditSettings
from mcp_fhir.audit.trail import build_trail

__all__ = ["main", "run"]

DEFAULT_N = 200
DEFAULT_CONCURRENCY = 16
WARMUP_CALLS = 5
SIGN_SAMPLES = 500


def _record(n: int) -> AuditRecord:
    return AuditRecord(
        ts="2026-11-25T03:04:05.123Z",
        request_id=f"bench-{n}",
        subject_id="agent-bench",
        authn="oauth",
        tool="read_patient",
        resource_type="Patient",
        operation="read",
        patient=f"pat-{n % 7}",
        backend="default",
        scopes=("user/Patient.rs",),
        purpose="bench",
        decision_id=f"dec-{n}",
    )


def _summary(label: str, samples: list[float], commits: int) -> str:
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{label:<22} n={len(samples):<5} mean={statistics.fmean(samples) * 1e3:7.2f} ms "
        f"p50={p50 * 1e3:7.2f} ms p99={p99 * 1e3:7.2f} ms commits={commits}"
    )


def _bare_fsync(directory: Path, n: int) -> list[float]:
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            os.write(fd, b'{"probe": true}\n')
            os.fsync(fd)
            samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    return samples


async def run(n: int, concurrency: int, directory: Path) -> list[str]:
    """Run the three measurements in ``directory``; return the printable lines."""
    settings = AuditSettings(sink="file", path=str(directory / "audit" / "audit.jsonl"), writer_id="bench")
    trail = build_trail(settings)
    await trail.start()
    lines = [_summary("bare write+fsync", _bare_fsync(directory, n), n)]
    try:
        for i in range(WARMUP_CALLS):
            await trail.record(_record(-i))
        before = trail.sink.commit_count
        samples: list[float] = []
        for i in range(n):
            started = time.perf_counter()
            await trail.record(_record(i))
            samples.append(time.perf_counter() - started)
        lines.append(_summary("sequential record()", samples, trail.sink.commit_count - before))

        before = trail.sink.commit_count
        concurrent: list[float] = []

        async def one(i: int) -> None:
            started = time.perf_counter()
            await trail.record(_record(i))
            concurrent.append(time.perf_counter() - started)

        for start in range(0, n, concurrency):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + concurrency))))
        lines.append(
            _summary(f"concurrent record() c={concurrency}", concurrent, trail.sink.commit_count - before)
        )
    finally:
        await trail.close()
    size = _size(Path(str(settings.path)))
    lines.append(
        f"trail bytes per record   {size / (2 * n + WARMUP_CALLS):.0f} (records and their checkpoints)"
    )
    lines.append(f"one checkpoint signature {_sign_cost() * 1e6:.0f} us (Ed25519, median of {SIGN_SAMPLES})")
    return lines


def _size(path: Path) -> int:
    return path.stat().st_size


def _sign_cost() -> float:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = CheckpointSigner(Ed25519PrivateKey.generate())
    cp = {
        "seq": 1,
        "hash": "0" * 64,
        "ts": "2026-11-25T03:04:05.123Z",
        "writer": "bench",
        "kid": signer.key_id,
    }
    samples = []
    for _ in range(SIGN_SAMPLES):
        started = time.perf_counter()
        signer.sign(cp)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run in a temporary directory (or ``--dir``), print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.audit_write")
    parser.add_argument("--n", type=int, default=DEFAULT_N)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for line in asyncio.run(run(args.n, args.concurrency, Path(tmp))):
            print(line)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
