"""Time the accounting of disclosures over a large trail: ``python -m bench.disclosures``.

Generates a trail of N records (default 1,000,000) in the exact stored form the writer produces
(chained entries, a signed checkpoint after every batch of ``--batch`` records, a witness), then
times ``build_disclosures`` for one patient: verification of every entry (hash, chain, signatures,
witness) and the collection of that patient's records happen in one pass. Prints the generation
time, the report's wall and CPU time (on a shared machine the CPU time is the steadier figure), the
entries per second and the report's counts. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_fhir.audit.chain import ChainHead, canonical_json, seal
from mcp_fhir.audit.crypto import CheckpointSigner
from mcp_fhir.audit.disclosures import build_disclosures
from mcp_fhir.audit.record import AuditRecord
from mcp_fhir.audit.verify import file_items
from mcp_fhir.audit.witness import FileWitness

__all__ = ["generate", "main"]

DEFAULT_RECORDS = 1_000_000
DEFAULT_BATCH = 64
PATIENTS = 1000
PURPOSES = ("treatment", "emergency", "payment", "operations")


def _record(n: int) -> dict[str, object]:
    denied = n % 11 == 0
    return AuditRecord(
        ts=f"2026-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:00.000Z",
        request_id=f"req-{n}",
        subject_id=f"agent-{n % 17}",
        on_behalf_of=f"clinician-{n % 53}",
        authn="oauth",
        tool="search_observations",
        resource_type="Observation",
        operation="search-type",
        patient=f"pat-{n % PATIENTS}",
        backend="epic",
        scopes=("patient/Observation.rs",),
        purpose=PURPOSES[n % len(PURPOSES)],
        result="denied" if denied else "allowed",
        reason_codes=("PURPOSE_NOT_ALLOWED",) if denied else (),
        break_glass_reason="unconscious patient in ED" if n % 97 == 0 else None,
        returned_count=None if denied else n % 9,
        filtered_count=None if denied else n % 3,
        decision_id=f"dec-{n}",
        policy_revision="rev-1",
        params={"category": "laboratory", "_count": 20},
    ).to_dict()


def generate(path: Path, witness: Path, records: int, batch: int, signer: CheckpointSigner) -> None:
    """Write ``records`` records in batches, each closed by a signed checkpoint, as the trail does."""
    head = ChainHead()
    last: dict[str, object] = {}
    with path.open("wb") as fh:
        for start in range(0, records, batch):
            lines = []
            for n in range(start, min(records, start + batch)):
                lines.append(canonical_json(seal(head, {"record": _record(n)})))
            cp = {"seq": head.seq, "hash": head.hash, "ts": "2026-12-31T00:00:00.000Z", "writer": "bench",
                  "kid": signer.key_id}  # fmt: skip
            last = seal(head, {"checkpoint": cp, "sig": signer.sign(cp), "pub": signer.key_id})
            lines.append(canonical_json(last))
            fh.write(b"\n".join(lines) + b"\n")
    FileWitness(witness).write(last)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.disclosures")
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="records per group commit")
    parser.add_argument("--patient", default="pat-7")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    key = Ed25519PrivateKey.generate()
    signer = CheckpointSigner(key)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, witness = Path(tmp) / "audit.jsonl", Path(tmp) / "witness.json"
        started = time.perf_counter()
        generate(path, witness, args.records, args.batch, signer)
        generated = time.perf_counter() - started
        size = path.stat().st_size
        started, cpu_started = time.perf_counter(), time.process_time()
        report = build_disclosures(
            file_items(path), patient=args.patient, public_key=key.public_key(),
            witness=FileWitness(witness).read(), require_witness=True,
        )  # fmt: skip
        took, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    entries = report.trail["entries"]
    print(
        f"generated {args.records:,} records ({entries:,} entries, {size / 1e6:.0f} MB) in {generated:.1f} s"
    )
    print(
        f"disclosures for {args.patient}: verified and read {entries:,} entries in {took:.1f} s "
        f"({entries / took:,.0f} entries/s; {cpu:.1f} s of CPU): {len(report.accesses)} accesses, "
        f"{len(report.denied)} denied, {len(report.break_glass)} break-glass"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
