"""The audit benchmarks (`bench.audit_write`, `bench.disclosures`) run end to end on a tiny trail."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench import audit_write, disclosures
from mcp_fhir.audit.crypto import CheckpointSigner
from mcp_fhir.audit.verify import file_items, verify_entries
from mcp_fhir.audit.witness import FileWitness


async def test_the_audit_write_bench_reports_every_figure(tmp_path: Path):
    lines = await audit_write.run(4, 2, tmp_path)
    labels = (
        "bare write+fsync",
        "sequential record()",
        "concurrent record() c=2",
        "trail bytes",
        "one checkpoint",
    )
    assert all(line.startswith(label) for line, label in zip(lines, labels, strict=True))


def test_the_disclosures_bench_generates_a_trail_that_verifies(tmp_path: Path):
    key = Ed25519PrivateKey.generate()
    path, witness = tmp_path / "audit.jsonl", tmp_path / "witness.json"
    disclosures.generate(path, witness, 10, 4, CheckpointSigner(key))
    report = verify_entries(
        file_items(path),
        public_key=key.public_key(),
        witness=FileWitness(witness).read(),
        require_witness=True,
    )
    assert report.ok
    assert report.records == 10
